"""Public checks of lab 01_attention: the tests course.yaml marks public, copied from
test_01_attention.py by `course release` with the code they use. Students run them with
`course validate`. Edit the suite and release again, not this copy."""

from __future__ import annotations
import pytest
import torch
import torch.nn.functional as F
from coursekit import testing
from coursekit.testing import assert_close, assert_shape, gen


TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}


def randn(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """This suite's inputs are float32 unless a test says otherwise."""
    return testing.randn(g, *shape, dtype=dtype)


def oracle_attention(q, k, v, mask=None):
    """PyTorch's (output, weights) for float64 CPU inputs (differentiable in q, k, v)."""
    attn_mask = None if mask is None else (mask.cpu() != 0)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    lk = k.shape[-2]
    eye = torch.eye(lk, dtype=q.dtype).expand(*batch, lk, lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    weights = F.scaled_dot_product_attention(q, k, eye, attn_mask=attn_mask)
    return out, weights


def check(actual, expected64, dtype, what, tol=TOL):
    """Compare a student result (any device) with a float64 oracle at the input dtype."""
    assert isinstance(actual, torch.Tensor), f"{what} should be a tensor, got {type(actual).__name__}"
    assert_close(actual.cpu(), expected64.detach().to(dtype), **tol[dtype], what=what)


def call_sdpa(student, q, k, v, device, mask=None, **kwargs):
    fn = student.scaled_dot_product_attention
    args = [t.to(device) for t in (q, k, v)]
    if mask is not None:
        kwargs["mask"] = mask.to(device)
    result = fn(*args, **kwargs)
    return unpack_pair(result, "scaled_dot_product_attention")


def unpack_pair(result, name):
    assert isinstance(result, tuple) and len(result) == 2, (
        f"{name} must return a tuple (output, weights); got {type(result).__name__}")
    out, weights = result
    assert isinstance(out, torch.Tensor) and isinstance(weights, torch.Tensor), (
        f"{name} must return two tensors (output, weights)")
    return out, weights


def check_sdpa(student, device, q, k, v, mask=None, what=""):
    """Run the student's attention on (q, k, v, mask) and compare it with PyTorch's."""
    out, weights = call_sdpa(student, q, k, v, device, mask=mask)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    assert_shape(out.cpu(), (*batch, q.shape[-2], v.shape[-1]), what=f"output{what}")
    assert_shape(weights.cpu(), (*batch, q.shape[-2], k.shape[-2]), what=f"weights{what}")
    ref_out, ref_w = oracle_attention(q.double(), k.double(), v.double(), mask)
    check(out, ref_out, q.dtype, f"output{what}")
    check(weights, ref_w, q.dtype, f"weights{what}")
    return out.cpu(), weights.cpu()


SDPA_SIZES = [
    # (batch shape, Lq, Lk, d_k, d_v)
    ((), 1, 1, 1, 1),
    ((2,), 3, 5, 4, 6),
    ((3,), 7, 7, 16, 16),
    ((2, 4), 6, 9, 8, 3),
    ((1,), 33, 17, 64, 32),
]


@pytest.mark.parametrize("case", range(len(SDPA_SIZES)),
                         ids=[f"batch {b or 'none'}, Lq={lq} Lk={lk} d_k={dk} d_v={dv}" for b, lq, lk, dk, dv in SDPA_SIZES])
def test_sdpa_matches_pytorch(student, device, case):
    batch, lq, lk, d_k, d_v = SDPA_SIZES[case]
    g = gen(100 + case)
    q, k, v = randn(g, *batch, lq, d_k), randn(g, *batch, lk, d_k), randn(g, *batch, lk, d_v)
    what = f" (no mask, q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    _, weights = check_sdpa(student, device, q, k, v, what=what)
    row_sums = weights.double().sum(-1)
    assert_close(row_sums, torch.ones_like(row_sums), atol=1e-5, rtol=0, what=f"row sums of the weights{what}")


PADDING_CASES = [
    # (token ids, pad_id)
    ([[5, 7, 9, 0, 0, 0], [3, 4, 0, 0, 0, 0], [8, 8, 8, 8, 8, 8]], 0),
    ([[1, 2, 3, 1, 4], [6, 1, 1, 1, 1]], 1),
    ([[11], [42], [7], [11]], 11),
    ([[464, 3290, 50256, 50256, 50256, 50256, 50256], [50256] * 7], 50256),
]


@pytest.mark.parametrize("case", range(len(PADDING_CASES)),
                         ids=[f"pad_id={pad}, {len(ids)}x{len(ids[0])}" for ids, pad in PADDING_CASES])
def test_make_padding_mask(student, device, case):
    ids, pad_id = PADDING_CASES[case]
    ids = torch.tensor(ids, dtype=torch.int32 if case == 3 else torch.long)
    mask = student.make_padding_mask(ids.to(device), pad_id)
    assert isinstance(mask, torch.Tensor), "make_padding_mask must return a tensor"
    assert mask.dtype == torch.bool, f"the padding mask must be a bool tensor, got {mask.dtype}"
    b, length = ids.shape
    assert_shape(mask.cpu(), (b, 1, 1, length), what="padding mask")
    assert mask.device.type == torch.device(device).type, (
        f"the padding mask is on {mask.device}; it should be on the token ids' device")
    expected = (ids != pad_id)[:, None, None, :]
    wrong = (mask.cpu() != expected).nonzero()
    assert len(wrong) == 0, (
        f"padding mask is wrong at (batch, position) {tuple(wrong[0, [0, 3]].tolist())}: it must be "
        "True for real tokens and False for pad_id")
