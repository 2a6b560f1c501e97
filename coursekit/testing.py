"""The one surface the hidden suites import: the student's exception types, seeded
inputs, and assertions with messages written for students (what differs and by how
much, never the expected tensor itself). The fixtures (`student`, `device`, `oracle_cache`,
`lab_settings`, `data_dir`) come from the engine's pytest plugin."""
from __future__ import annotations

from typing import Any

import torch

from coursekit.errors import MissingName, StudentCrashed, StudentError, StudentTimeout

__all__ = ["MissingName", "StudentCrashed", "StudentError", "StudentTimeout", "gen", "randn", "randomize_",
           "assert_shape", "assert_close", "assert_equal"]


def gen(seed: int) -> torch.Generator:
    """A CPU generator: the same inputs on every machine and device."""
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    """Drawn in float64, then rounded to `dtype`: a float64 oracle fed `.double()` of the
    result sees exactly the values the student's code sees."""
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def randomize_(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Every parameter of an oracle module random, so that each one matters (a default
    LayerNorm gain of 1 or bias of 0 would hide a student's module ignoring it): norms
    near 1/0 but not at, matrices ~ 1/sqrt(fan_in), other vectors 0.2 scale."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    type_name = getattr(value, "type_name", type(value).__name__)
    raise AssertionError(f"{what}: expected a torch.Tensor, got {type_name}")


def assert_shape(actual: Any, shape: tuple[int, ...] | torch.Size, what: str = "the result") -> None:
    tensor = _as_tensor(actual, what)
    if tuple(tensor.shape) != tuple(shape):
        raise AssertionError(f"{what} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def assert_close(actual: Any, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "the result", check_dtype: bool = True, equal_nan: bool = False) -> None:
    """``actual`` must match ``expected`` in shape, dtype (unless told otherwise)
    and value within ``atol + rtol * |expected|``, and hold no NaN or inf that the
    reference does not."""
    tensor = _as_tensor(actual, what)
    expected = expected.detach()
    if tuple(tensor.shape) != tuple(expected.shape):
        raise AssertionError(f"{what} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}")
    if check_dtype and tensor.dtype != expected.dtype:
        raise AssertionError(f"{what} has dtype {tensor.dtype}, expected {expected.dtype}")
    a = tensor.cpu().to(torch.float64) if not tensor.is_complex() else tensor.cpu().to(torch.complex128)
    e = expected.cpu().to(a.dtype)
    if a.numel() == 0:
        return
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    if (bad_a != bad_e).any():
        index = tuple(torch.nonzero(bad_a != bad_e)[0].tolist())
        raise AssertionError(f"{what} has NaN or inf where the reference is finite (or the reverse), "
                             f"first at index {index}")
    if bad_a.any() and not equal_nan and not torch.equal(a[bad_a], e[bad_a]):
        raise AssertionError(f"{what} has NaN where the reference has NaN too, which this check does not accept")
    finite = ~bad_a
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a.real) if a.is_complex() else torch.zeros_like(a))
    allowed = atol + rtol * e.abs()
    over = diff > allowed
    if over.any():
        flat = int(torch.argmax((diff - allowed).reshape(-1)))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{what} differs from the reference: max abs diff {float(diff.max()):.3g} "
            f"(at index {index}; {int(over.sum())} of {a.numel()} elements off; atol={atol:g}, rtol={rtol:g})")


def assert_equal(actual: Any, expected: Any, what: str = "the result") -> None:
    """Exact equality for tensors (shape, dtype, every element) and plain values."""
    if isinstance(expected, torch.Tensor):
        tensor = _as_tensor(actual, what)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise AssertionError(f"{what} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}")
        if tensor.dtype != expected.dtype:
            raise AssertionError(f"{what} has dtype {tensor.dtype}, expected {expected.dtype}")
        mismatch = tensor.cpu() != expected.cpu()
        if mismatch.any():
            index = tuple(torch.nonzero(mismatch)[0].tolist())
            raise AssertionError(f"{what} differs from the reference at {int(mismatch.sum())} position(s), first at index {index}")
        return
    if type(actual) is not type(expected) or actual != expected:
        raise AssertionError(f"{what} differs from the reference")
