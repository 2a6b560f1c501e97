"""Hidden suite for lab 01: attention from scratch.

Oracles, all computed here in the grader's process, in float64 on the CPU:
- `torch.nn.functional.scaled_dot_product_attention` for the attention output; its attention
  weights are the same call with identity matrices as the values (each output row is then the
  row of weights);
- `torch.nn.attention.bias.causal_lower_right` for the causal mask;
- `torch.nn.MultiheadAttention` (batch_first, weights copied from it into the student's module) for
  multi-head attention, compared on the rows it does not turn into NaN (fully masked queries);
- matplotlib's own objects for `plot_attention`, read back through handles.

Student float32 results are compared with the float64 oracle rounded to float32, so a wrong dtype is
reported as such and every correct float32 implementation passes.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from coursekit import testing
from coursekit.testing import assert_close, assert_shape, gen

TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}
GRAD_TOL = {
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-9, rtol=1e-8),
}


# -- helpers ----------------------------------------------------------------------------------


def randn(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """This suite's inputs are float32 unless a test says otherwise."""
    return testing.randn(g, *shape, dtype=dtype)


def random_mask(g: torch.Generator, *shape: int, p_keep: float = 0.6) -> torch.Tensor:
    """A random boolean mask with at least one True per row (no fully masked rows)."""
    mask = torch.rand(*shape, generator=g) < p_keep
    first = torch.zeros(shape[-1], dtype=torch.bool)
    first[torch.randint(shape[-1], (1,), generator=g)] = True
    return mask | (~mask.any(-1, keepdim=True) & first)


def causal(q_len: int, k_len: int) -> torch.Tensor:
    """PyTorch's bottom-right causal mask, materialised as a boolean (q_len, k_len) tensor."""
    with warnings.catch_warnings():
        # It warns that its own fused kernels give NaN when q_len > k_len; we only materialise it.
        warnings.simplefilter("ignore", UserWarning)
        return causal_lower_right(q_len, k_len)._materialize(torch.device("cpu"))


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


# -- scaled_dot_product_attention ----------------------------------------------------------------

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


def _mask_case(name: str, g: torch.Generator):
    """(q, k, v, mask) for one mask kind; masks leave every query at least one key."""
    if name == "key padding (B, 1, Lk)":
        q, k, v = randn(g, 3, 4, 8), randn(g, 3, 6, 8), randn(g, 3, 6, 5)
        lengths = torch.tensor([6, 4, 1])
        return q, k, v, (torch.arange(6)[None, None, :] < lengths[:, None, None])
    if name == "shared (Lq, Lk)":
        q, k, v = randn(g, 2, 5, 4), randn(g, 2, 7, 4), randn(g, 2, 7, 4)
        return q, k, v, random_mask(g, 5, 7)
    if name == "per example (B, Lq, Lk)":
        q, k, v = randn(g, 3, 5, 6), randn(g, 3, 5, 6), randn(g, 3, 5, 2)
        return q, k, v, random_mask(g, 3, 5, 5)
    if name == "padding with heads (B, 1, 1, Lk)":
        q, k, v = randn(g, 2, 3, 4, 8), randn(g, 2, 3, 9, 8), randn(g, 2, 3, 9, 8)
        lengths = torch.tensor([9, 3])
        return q, k, v, (torch.arange(9) < lengths[:, None])[:, None, None, :]
    if name == "causal, square":
        q, k, v = randn(g, 2, 6, 8), randn(g, 2, 6, 8), randn(g, 2, 6, 8)
        return q, k, v, causal(6, 6)
    if name == "causal, Lq < Lk (bottom-right)":
        q, k, v = randn(g, 2, 2, 3, 8), randn(g, 2, 2, 7, 8), randn(g, 2, 2, 7, 4)
        return q, k, v, causal(3, 7)
    if name == "0/1 int64 mask":
        q, k, v = randn(g, 2, 5, 4), randn(g, 2, 6, 4), randn(g, 2, 6, 3)
        return q, k, v, random_mask(g, 2, 5, 6).long()
    if name == "0/1 uint8 mask":
        q, k, v = randn(g, 4, 4), randn(g, 5, 4), randn(g, 5, 3)
        return q, k, v, random_mask(g, 4, 5).to(torch.uint8)
    if name == "0/1 float mask":
        q, k, v = randn(g, 2, 5, 4), randn(g, 2, 6, 4), randn(g, 2, 6, 3)
        return q, k, v, random_mask(g, 5, 6).float()
    raise KeyError(name)


MASK_CASES = [
    "key padding (B, 1, Lk)", "shared (Lq, Lk)", "per example (B, Lq, Lk)",
    "padding with heads (B, 1, 1, Lk)", "causal, square", "causal, Lq < Lk (bottom-right)",
    "0/1 int64 mask", "0/1 uint8 mask", "0/1 float mask",
]


@pytest.mark.parametrize("kind", MASK_CASES)
def test_sdpa_masks(student, device, kind):
    g = gen(200 + MASK_CASES.index(kind))
    q, k, v, mask = _mask_case(kind, g)
    _, weights = check_sdpa(student, device, q, k, v, mask=mask, what=f" (mask: {kind})")
    hidden = ~torch.broadcast_to(mask != 0, weights.shape)
    assert (weights[hidden] == 0).all(), (
        f"masked positions must get probability exactly 0 (mask: {kind}); remember that True / "
        "nonzero means 'may attend'")


FULLY_MASKED = [
    "one query row masked", "causal with Lq > Lk", "a whole batch element padded", "everything masked",
]


@pytest.mark.parametrize("kind", FULLY_MASKED)
def test_sdpa_fully_masked_rows(student, device, kind):
    g = gen(300 + FULLY_MASKED.index(kind))
    if kind == "one query row masked":
        q, k, v = randn(g, 2, 4, 8), randn(g, 2, 6, 8), randn(g, 2, 6, 5)
        mask = random_mask(g, 4, 6)
        mask[2] = False
    elif kind == "causal with Lq > Lk":
        q, k, v = randn(g, 2, 7, 8), randn(g, 2, 4, 8), randn(g, 2, 4, 8)
        mask = causal(7, 4)
    elif kind == "a whole batch element padded":
        q, k, v = randn(g, 3, 2, 5, 4), randn(g, 3, 2, 5, 4), randn(g, 3, 2, 5, 4)
        lengths = torch.tensor([5, 0, 2])
        mask = (torch.arange(5) < lengths[:, None])[:, None, None, :]
    else:
        q, k, v = randn(g, 2, 3, 4), randn(g, 2, 5, 4), randn(g, 2, 5, 6)
        mask = torch.zeros(3, 5, dtype=torch.bool)
    out, weights = call_sdpa(student, q, k, v, device, mask=mask)
    out, weights = out.cpu(), weights.cpu()
    assert_shape(out, (*q.shape[:-1], v.shape[-1]), what=f"output ({kind})")
    assert_shape(weights, (*q.shape[:-1], k.shape[-2]), what=f"weights ({kind})")
    assert torch.isfinite(out).all() and torch.isfinite(weights).all(), (
        f"a query whose keys are all masked produced NaN or inf ({kind}); such a row must give "
        "all-zero weights and an all-zero output")
    dead = ~torch.broadcast_to(mask, weights.shape).any(-1)  # (..., Lq)
    assert (weights[dead] == 0).all(), f"a fully masked row must have all-zero weights ({kind})"
    assert (out[dead] == 0).all(), f"a fully masked row must give an all-zero output ({kind})"
    ref_out, ref_w = oracle_attention(q.double(), k.double(), v.double(), mask)
    check(out, ref_out, torch.float32, f"output ({kind})")
    check(weights, ref_w, torch.float32, f"weights ({kind})")


def _large_scores(g: torch.Generator, batch: int, lq: int, lk: int, dtype):
    """Queries and keys whose scores are about +-1e4 apart from small integer offsets. All values
    are small integers and d_k = 4, so q @ k^T / sqrt(d_k) is exact in float32: the only rounding
    left is the softmax's, and a stable float32 softmax agrees with float64 to ~1e-7."""
    sign = torch.where(torch.rand(batch, lq, generator=g) < 0.5, -1.0, 1.0)
    q = torch.randint(-2, 3, (batch, lq, 4), generator=g).double()
    k = torch.randint(-2, 3, (batch, lk, 4), generator=g).double()
    q[..., 0] = 200.0 * sign
    k[..., 0] = 100.0                                     # score = +-1e4 + (small integer) / 2
    v = torch.randn(batch, lk, 3, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding mask"])
def test_sdpa_large_scores(student, device, dtype, masked):
    g = gen(400 + 2 * int(masked) + int(dtype == torch.float64))
    q, k, v = _large_scores(g, 3, 5, 8, dtype)
    mask = (torch.arange(8) < torch.tensor([8, 5, 2])[:, None])[:, None, :] if masked else None
    out, weights = call_sdpa(student, q, k, v, device, mask=mask)
    assert torch.isfinite(out.cpu()).all() and torch.isfinite(weights.cpu()).all(), (
        "scores of magnitude 1e4 produced NaN or inf: subtract each row's maximum score before "
        "exponentiating")
    ref_out, ref_w = oracle_attention(q.double(), k.double(), v.double(), mask)
    what = f" (scores of magnitude 1e4, {str(dtype).replace('torch.', '')})"
    check(out, ref_out, dtype, "output" + what)
    check(weights, ref_w, dtype, "weights" + what)


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "causal mask"])
@pytest.mark.parametrize("case", [0, 1], ids=["3-d inputs", "4-d inputs"])
def test_sdpa_float64(student, device, masked, case):
    batch, lq, lk, d_k, d_v = [((2,), 5, 7, 8, 4), ((2, 3), 6, 6, 16, 16)][case]
    g = gen(500 + 2 * case + int(masked))
    q = randn(g, *batch, lq, d_k, dtype=torch.float64)
    k = randn(g, *batch, lk, d_k, dtype=torch.float64)
    v = randn(g, *batch, lk, d_v, dtype=torch.float64)
    mask = causal(lq, lk) if masked else None
    check_sdpa(student, device, q, k, v, mask=mask, what=" (float64 inputs)")


BATCH_CASES = [
    # (q shape, k shape, v shape, mask shape or None)
    ((5, 8), (6, 8), (6, 3), None),                            # no batch dimension at all
    ((2, 3, 2, 5, 8), (2, 3, 2, 7, 8), (2, 3, 2, 7, 4), None),
    ((2, 3, 2, 5, 8), (2, 3, 2, 7, 8), (2, 3, 2, 7, 4), (7,)),
    ((2, 2, 2, 2, 3, 4), (2, 2, 2, 2, 6, 4), (2, 2, 2, 2, 6, 5), (2, 1, 1, 1, 1, 6)),
]


@pytest.mark.parametrize("case", range(len(BATCH_CASES)),
                         ids=[f"q{q} " + (f"mask{m}" if m else "no mask") for q, _, _, m in BATCH_CASES])
def test_sdpa_extra_batch_dims(student, device, case):
    q_shape, k_shape, v_shape, mask_shape = BATCH_CASES[case]
    g = gen(600 + case)
    q, k, v = randn(g, *q_shape), randn(g, *k_shape), randn(g, *v_shape)
    mask = random_mask(g, *mask_shape) if mask_shape else None
    check_sdpa(student, device, q, k, v, mask=mask, what=f" (q of shape {q_shape})")


GRAD_CASES = ["no mask", "padding mask", "causal with fully masked rows", "float64"]


@pytest.mark.parametrize("kind", GRAD_CASES)
def test_sdpa_gradients(student, device, kind):
    g = gen(700 + GRAD_CASES.index(kind))
    dtype = torch.float64 if kind == "float64" else torch.float32
    lq, lk = (6, 4) if kind == "causal with fully masked rows" else (5, 7)
    q, k, v = randn(g, 2, 3, lq, 8, dtype=dtype), randn(g, 2, 3, lk, 8, dtype=dtype), randn(g, 2, 3, lk, 6, dtype=dtype)
    mask = {"padding mask": (torch.arange(lk) < torch.tensor([lk, 3])[:, None])[:, None, None, :],
            "causal with fully masked rows": causal(lq, lk)}.get(kind)
    go_out, go_w = randn(g, 2, 3, lq, 6, dtype=dtype), randn(g, 2, 3, lq, lk, dtype=dtype)

    leaves = [t.detach().to(device).clone().requires_grad_() for t in (q, k, v)]
    kwargs = {} if mask is None else {"mask": mask.to(device)}
    result = student.backward(student.scaled_dot_product_attention, *leaves,
                              grad_outputs=(go_out.to(device), go_w.to(device)), **kwargs)

    ref = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_w = oracle_attention(*ref, mask)
    ((ref_out * go_out.double()).sum() + (ref_w * go_w.double()).sum()).backward()
    for name, grad, leaf in zip("qkv", result.grads, ref):
        assert grad is not None, (
            f"no gradient reached {name} ({kind}): the output and the weights must stay connected "
            f"to q, k and v (no .detach(), no torch.no_grad, no .data)")
        assert torch.isfinite(grad.cpu()).all(), f"the gradient of {name} contains NaN or inf ({kind})"
        check(grad, leaf.grad, dtype, f"gradient of {name} ({kind})", tol=GRAD_TOL)


@pytest.mark.parametrize("p", [0.5, 0.2], ids=["dropout_p=0.5", "dropout_p=0.2"])
def test_sdpa_dropout(student, device, p):
    g = gen(800 + int(p * 10))
    q, k, v = randn(g, 4, 16, 8), randn(g, 4, 32, 8), randn(g, 4, 32, 5)
    out, weights = call_sdpa(student, q, k, v, device, dropout_p=p)
    out, weights = out.cpu().double(), weights.cpu().double()
    assert_shape(weights, (4, 16, 32), what=f"weights (dropout_p={p})")
    _, ref_w = oracle_attention(q.double(), k.double(), v.double())
    dropped = weights == 0
    fraction = dropped.double().mean().item()
    assert abs(fraction - p) < 0.08, (
        f"with dropout_p={p}, {fraction:.0%} of the returned weights are zero; about {p:.0%} should "
        "be (return the weights after dropout)")
    assert_close(weights[~dropped], (ref_w / (1 - p))[~dropped], atol=1e-4, rtol=1e-4,
                 what=f"weights kept by dropout (dropout_p={p}; kept weights are scaled by 1/(1-p))")
    assert_close(out, weights @ v.double(), atol=5e-5, rtol=1e-4,
                 what=f"output (dropout_p={p}; it must be the returned weights times v)")


# -- masks --------------------------------------------------------------------------------------

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


CAUSAL_CASES = [
    # (q_len, k_len or None to leave it out, pass device=)
    (1, 1, False), (4, None, False), (5, None, True), (5, 5, True), (3, 7, False), (1, 9, True),
    (6, 4, False), (8, 1, True), (16, 16, False),
]


@pytest.mark.parametrize("q_len,k_len,pass_device", CAUSAL_CASES,
                         ids=[f"q_len={q} k_len={k}{' device' if d else ''}" for q, k, d in CAUSAL_CASES])
def test_make_causal_mask(student, device, q_len, k_len, pass_device):
    args = (q_len,) if k_len is None else (q_len, k_len)
    kwargs = {"device": device} if pass_device else {}
    mask = student.make_causal_mask(*args, **kwargs)
    k = q_len if k_len is None else k_len
    label = f"make_causal_mask({', '.join(map(str, args))}{', device=...' if pass_device else ''})"
    assert isinstance(mask, torch.Tensor), f"{label} must return a tensor"
    assert mask.dtype == torch.bool, f"{label} must be a bool tensor, got {mask.dtype}"
    assert_shape(mask.cpu(), (q_len, k), what=label)
    expected_device = torch.device(device).type if pass_device else "cpu"
    assert mask.device.type == expected_device, f"{label} is on {mask.device}, expected {expected_device}"
    wrong = (mask.cpu() != causal(q_len, k)).nonzero()
    assert len(wrong) == 0, (
        f"{label} is wrong at (query, key) {tuple(wrong[0].tolist())}: query i may see key j "
        "exactly when j <= i + (k_len - q_len) (aligned bottom-right)")


# -- MultiHeadAttention ---------------------------------------------------------------------------


def make_reference(d_model: int, num_heads: int, bias: bool, seed: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention with random weights and (unlike its default) random biases."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = nn.MultiheadAttention(d_model, num_heads, bias=bias, batch_first=True)
        if bias:
            with torch.no_grad():
                ref.in_proj_bias.normal_(0.0, 0.5)
                ref.out_proj.bias.normal_(0.0, 0.5)
    return ref.eval()


def student_state_dict(ref: nn.MultiheadAttention, dtype=torch.float32) -> dict:
    d = ref.embed_dim
    w = ref.in_proj_weight.detach()
    sd = {"w_q.weight": w[:d], "w_k.weight": w[d:2 * d], "w_v.weight": w[2 * d:],
          "w_o.weight": ref.out_proj.weight.detach()}
    if ref.in_proj_bias is not None:
        b = ref.in_proj_bias.detach()
        sd.update({"w_q.bias": b[:d], "w_k.bias": b[d:2 * d], "w_v.bias": b[2 * d:],
                   "w_o.bias": ref.out_proj.bias.detach()})
    return {name: t.to(dtype).clone() for name, t in sd.items()}


def build_student_mha(student, ref, device, dtype=torch.float32, **kwargs):
    mha = student.MultiHeadAttention(ref.embed_dim, ref.num_heads, bias=ref.in_proj_bias is not None,
                                     **kwargs)
    sd = student_state_dict(ref, dtype)
    try:
        mha.load_state_dict(sd)
    except RuntimeError as exc:
        raise AssertionError(
            f"could not load weights into MultiHeadAttention: it must have exactly the parameters "
            f"{sorted(sd)} (submodules w_q, w_k, w_v, w_o, each nn.Linear(d_model, d_model, "
            f"bias=bias)). The error was: {exc}") from None
    mha.to(device=torch.device(device), dtype=dtype)
    mha.eval()
    return mha


def oracle_mha(ref, query, key, value, mask=None):
    """nn.MultiheadAttention's (output, per-head weights) in float64; NaN on fully masked rows."""
    ref64 = copy.deepcopy(ref).double().eval()
    attn_mask = None
    if mask is not None:
        b, lq, lk, h = query.shape[0], query.shape[1], key.shape[1], ref.num_heads
        allowed = torch.broadcast_to(mask.cpu() != 0, (b, h, lq, lk)).reshape(b * h, lq, lk)
        attn_mask = ~allowed                                  # True = hidden, for nn.MultiheadAttention
    return ref64(query.double(), key.double(), value.double(), attn_mask=attn_mask,
                 need_weights=True, average_attn_weights=False)


def check_mha(student, device, ref, query, key, value, mask=None, dtype=torch.float32, what=""):
    """Compare the student's module (with ref's weights) with nn.MultiheadAttention."""
    mha = build_student_mha(student, ref, device, dtype)
    args = [t.to(dtype).to(device) for t in (query, key, value)]
    kwargs = {} if mask is None else {"mask": mask.to(device)}
    out, weights = unpack_pair(mha(*args, **kwargs), "MultiHeadAttention.forward")
    out, weights = out.cpu(), weights.cpu()
    b, lq, lk, h = query.shape[0], query.shape[1], key.shape[1], ref.num_heads
    assert_shape(out, (b, lq, ref.embed_dim), what=f"output{what}")
    assert_shape(weights, (b, h, lq, lk), what=f"weights{what}")
    assert torch.isfinite(out).all() and torch.isfinite(weights).all(), (
        f"NaN or inf in the result{what}; a query whose keys are all masked must get zero weights, not NaN")
    ref_out, ref_w = oracle_mha(ref, query, key, value, mask)
    if mask is None:
        check(out, ref_out, dtype, f"output{what}")
        check(weights, ref_w, dtype, f"weights{what}")
        return
    allowed = torch.broadcast_to(mask.cpu() != 0, (b, h, lq, lk))
    dead = ~allowed.any(-1)                                            # (B, H, Lq)
    check(weights[~dead], ref_w[~dead], dtype, f"weights{what}")
    assert (weights[dead] == 0).all(), f"a query whose keys are all masked must get all-zero weights{what}"
    live_queries = ~dead.any(1)                                        # (B, Lq)
    check(out[live_queries], ref_out[live_queries], dtype, f"output{what}")
    dead_queries = dead.all(1)
    if dead_queries.any():
        # No key to attend to: every head outputs zeros, so the output is w_o's bias.
        bias = ref.out_proj.bias if ref.out_proj.bias is not None else torch.zeros(ref.embed_dim)
        expected = bias.detach().double().expand(int(dead_queries.sum()), -1)
        check(out[dead_queries], expected, dtype, f"output of fully masked queries{what}")


MHA_CASES = [
    # (d_model, num_heads, batch, length, bias, dtype)
    (8, 1, 1, 1, True, torch.float32),
    (16, 4, 2, 5, True, torch.float32),
    (24, 3, 3, 7, False, torch.float32),
    (64, 8, 2, 10, True, torch.float32),
    (32, 2, 1, 12, True, torch.float64),
]


@pytest.mark.parametrize("case", range(len(MHA_CASES)), ids=[
    f"d_model={d} heads={h} B={b} L={n} bias={bias} {str(dt)[6:]}" for d, h, b, n, bias, dt in MHA_CASES])
def test_mha_matches_nn_multihead_attention(student, device, case):
    d_model, heads, b, length, bias, dtype = MHA_CASES[case]
    ref = make_reference(d_model, heads, bias, seed=900 + case)
    x = randn(gen(910 + case), b, length, d_model, dtype=dtype)
    what = (f" (self-attention, d_model={d_model}, num_heads={heads}, bias={bias}, "
            f"{str(dtype).replace('torch.', '')})")
    check_mha(student, device, ref, x, x, x, dtype=dtype, what=what)


MHA_MASKS = [
    "(Lq, Lk) causal", "(B, 1, 1, Lk) padding", "(B, 1, Lq, Lk) padding and causal",
    "(B, H, Lq, Lk) per head", "(B, 1, 1, Lk) with a fully padded sequence",
]


@pytest.mark.parametrize("kind", MHA_MASKS)
def test_mha_masks(student, device, kind):
    i = MHA_MASKS.index(kind)
    b, length, d_model, heads = 3, 6, 16, 4
    ref = make_reference(d_model, heads, True, seed=1000 + i)
    g = gen(1010 + i)
    x = randn(g, b, length, d_model)
    lengths = torch.tensor([6, 4, 0 if "fully" in kind else 2])
    padding = (torch.arange(length) < lengths[:, None])[:, None, None, :]
    mask = {
        "(Lq, Lk) causal": causal(length, length),
        "(B, 1, 1, Lk) padding": padding,
        "(B, 1, Lq, Lk) padding and causal": padding & causal(length, length),
        "(B, H, Lq, Lk) per head": random_mask(g, b, heads, length, length),
        "(B, 1, 1, Lk) with a fully padded sequence": padding,
    }[kind]
    check_mha(student, device, ref, x, x, x, mask=mask, what=f" (mask {kind})")


CROSS_CASES = [
    # (batch, Lq, Lk, d_model, heads, mask kind)
    (2, 3, 7, 16, 4, None),
    (3, 8, 5, 12, 3, "source padding"),
    (2, 6, 4, 16, 2, "bottom-right causal, Lq > Lk"),
    (1, 4, 9, 20, 5, "distinct key and value"),
]


@pytest.mark.parametrize("case", range(len(CROSS_CASES)), ids=[
    f"Lq={lq} Lk={lk} {kind or 'no mask'}" for _, lq, lk, _, _, kind in CROSS_CASES])
def test_mha_cross_attention(student, device, case):
    b, lq, lk, d_model, heads, kind = CROSS_CASES[case]
    ref = make_reference(d_model, heads, True, seed=1100 + case)
    g = gen(1110 + case)
    x, memory = randn(g, b, lq, d_model), randn(g, b, lk, d_model)
    value = randn(g, b, lk, d_model) if kind == "distinct key and value" else memory
    mask = None
    if kind == "source padding":
        mask = (torch.arange(lk) < torch.tensor([5, 3, 1])[:, None])[:, None, None, :]
    elif kind and kind.startswith("bottom-right"):
        mask = causal(lq, lk)
    what = f" (cross-attention, Lq={lq}, Lk={lk}{', ' + kind if kind else ''})"
    check_mha(student, device, ref, x, memory, value, mask=mask, what=what)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding mask"])
def test_mha_gradients(student, device, bias, masked):
    seed = 1200 + 2 * int(bias) + int(masked)
    b, lq, lk, d_model, heads = 2, 4, 5, 12, 3
    ref = make_reference(d_model, heads, bias, seed=seed)
    g = gen(seed + 10)
    query, key, value = randn(g, b, lq, d_model), randn(g, b, lk, d_model), randn(g, b, lk, d_model)
    go_out, go_w = randn(g, b, lq, d_model), randn(g, b, heads, lq, lk)
    mask = (torch.arange(lk) < torch.tensor([5, 3])[:, None])[:, None, None, :] if masked else None

    mha = build_student_mha(student, ref, device)
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (query, key, value)]
    kwargs = {} if mask is None else {"mask": mask.to(device)}
    result = student.backward(mha, *leaves, grad_outputs=(go_out.to(device), go_w.to(device)), **kwargs)

    ref64 = copy.deepcopy(ref).double()
    ref_in = [t.detach().double().clone().requires_grad_() for t in (query, key, value)]
    attn_mask = None if mask is None else ~torch.broadcast_to(mask, (b, heads, lq, lk)).reshape(b * heads, lq, lk)
    ref_out, ref_w = ref64(*ref_in, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    ((ref_out * go_out.double()).sum() + (ref_w * go_w.double()).sum()).backward()

    for name, grad, leaf in zip(("query", "key", "value"), result.grads, ref_in):
        assert grad is not None, f"no gradient reached the {name} input"
        check(grad, leaf.grad, torch.float32, f"gradient of the {name} input", tol=GRAD_TOL)
    expected = student_state_dict_grads(ref64)
    for name, ref_grad in expected.items():
        grad = result.param_grads.get(name)
        assert grad is not None, f"no gradient reached the parameter {name}"
        check(grad, ref_grad, torch.float32, f"gradient of {name}", tol=GRAD_TOL)


def student_state_dict_grads(ref: nn.MultiheadAttention) -> dict:
    d = ref.embed_dim
    w = ref.in_proj_weight.grad
    grads = {"w_q.weight": w[:d], "w_k.weight": w[d:2 * d], "w_v.weight": w[2 * d:],
             "w_o.weight": ref.out_proj.weight.grad}
    if ref.in_proj_bias is not None:
        b = ref.in_proj_bias.grad
        grads.update({"w_q.bias": b[:d], "w_k.bias": b[d:2 * d], "w_v.bias": b[2 * d:],
                      "w_o.bias": ref.out_proj.bias.grad})
    return grads


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_mha_structure(student, bias):
    mha = student.MultiHeadAttention(24, 4, bias=bias)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        try:
            sub = getattr(mha, name)
        except AttributeError:
            raise AssertionError(f"MultiHeadAttention has no submodule {name}") from None
        assert sub is not None and sub.isinstance("torch.nn.Linear"), f"{name} must be an nn.Linear"
        assert (sub.in_features, sub.out_features) == (24, 24), f"{name} must map d_model to d_model"
    names = set(dict(mha.named_parameters()))
    expected = {f"{n}.{p}" for n in ("w_q", "w_k", "w_v", "w_o") for p in (("weight", "bias") if bias else ("weight",))}
    assert names == expected, (
        f"with bias={bias} the parameters must be exactly {sorted(expected)}; found {sorted(names)}")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mha_dropout(student, device, mode):
    ref = make_reference(16, 4, True, seed=1300)
    x = randn(gen(1301), 4, 12, 16)
    if mode == "eval":
        # dropout=0.5 but eval(): deterministic, exactly nn.MultiheadAttention.
        mha = build_student_mha(student, ref, device, dropout=0.5)
        out, weights = unpack_pair(mha(x.to(device), x.to(device), x.to(device)), "MultiHeadAttention.forward")
        ref_out, ref_w = oracle_mha(ref, x, x, x)
        check(out, ref_out, torch.float32, "output in eval() mode with dropout=0.5 (dropout must be off)")
        check(weights, ref_w, torch.float32, "weights in eval() mode with dropout=0.5 (dropout must be off)")
        return
    mha = build_student_mha(student, ref, device, dropout=0.5)
    mha.train()
    _, weights = unpack_pair(mha(x.to(device), x.to(device), x.to(device)), "MultiHeadAttention.forward")
    weights = weights.cpu().double()
    _, ref_w = oracle_mha(ref, x, x, x)
    dropped = weights == 0
    fraction = dropped.double().mean().item()
    assert abs(fraction - 0.5) < 0.08, (
        f"in train() mode with dropout=0.5, {fraction:.0%} of the attention weights are zero; "
        "about half should be (apply dropout to the attention weights when self.training)")
    assert_close(weights[~dropped], (2 * ref_w)[~dropped], atol=1e-4, rtol=1e-4,
                 what="attention weights kept by dropout in train() mode (scaled by 1/(1-p))")


@pytest.mark.parametrize("d_model,num_heads", [(10, 4), (7, 2), (12, 5), (6, 4)],
                         ids=["d_model=10 heads=4", "d_model=7 heads=2", "d_model=12 heads=5", "d_model=6 heads=4"])
def test_mha_invalid_heads_raises_value_error(student, d_model, num_heads):
    cls = student.MultiHeadAttention
    try:
        cls(d_model, num_heads)
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001 - reported to the student
        raise AssertionError(
            f"MultiHeadAttention({d_model}, {num_heads}) raised "
            f"{getattr(exc, 'type_name', type(exc).__name__)}; it must raise "
            "ValueError when d_model is not divisible by num_heads") from None
    raise AssertionError(
        f"MultiHeadAttention({d_model}, {num_heads}) did not raise: d_model must be divisible by "
        "num_heads, otherwise raise ValueError")


def test_mha_calls_student_sdpa(student, device):
    """The module must use the notebook's scaled_dot_product_attention, not a library's."""
    ref = make_reference(16, 4, True, seed=1400)
    x = randn(gen(1401), 2, 5, 16)
    mask = causal(5, 5)
    mha = build_student_mha(student, ref, device)
    sdpa = student.scaled_dot_product_attention
    # The notebook's global namespace, as seen from the module's own code.
    namespace = student.lib("builtins.getattr").keep(student.MultiHeadAttention.forward, "__globals__")
    setitem = student.lib("operator.setitem")
    spy = student.lib("unittest.mock.Mock").keep(wraps=sdpa)
    setitem(namespace, "scaled_dot_product_attention", spy)
    try:
        result = mha(x.to(device), x.to(device), x.to(device), mask=mask.to(device))
        calls = spy.call_count
    finally:
        setitem(namespace, "scaled_dot_product_attention", sdpa)
    assert type(calls) is int and calls >= 1, (
        "MultiHeadAttention.forward must call your own scaled_dot_product_attention (the notebook's "
        "global function), not re-implement attention or call a library's")
    out, weights = unpack_pair(result, "MultiHeadAttention.forward")
    ref_out, ref_w = oracle_mha(ref, x, x, x, mask)
    check(out, ref_out, torch.float32, "output (causal self-attention)")
    check(weights, ref_w, torch.float32, "weights (causal self-attention)")


# -- plot_attention -----------------------------------------------------------------------------

PLOT_CASES = [
    # (query tokens, key tokens, weights require grad, draw into a given Axes)
    (["the", "cat", "sat"], ["<s>", "the", "cat", "sat", "down"], False, False),
    (["a", "b", "c", "d", "e", "f"], ["x", "y", "z", "w"], True, False),
    (["je", "t'", "aime", "."], ["I", "love", "you", "."], False, True),
]


PLOT_IDS = ["3 queries x 5 keys", "6 queries x 4 keys, weights requiring grad", "4 x 4 into a given ax"]


def _plot(student, device, case):
    q_tokens, k_tokens, needs_grad, given_ax = PLOT_CASES[case]
    weights = torch.softmax(randn(gen(1500 + case), len(q_tokens), len(k_tokens)) * 2, dim=-1)
    if needs_grad:
        weights.requires_grad_()
    plt = student.lib("matplotlib.pyplot")
    plt.close("all")
    kwargs = {}
    if given_ax:
        _, ax_given = plt.subplots()
        ax_given.set_title("given")
        kwargs["ax"] = ax_given
    ax = student.plot_attention(weights.to(device), list(q_tokens), list(k_tokens), **kwargs)
    assert ax is not None and not isinstance(ax, (torch.Tensor, tuple, list, dict)), (
        "plot_attention must return the matplotlib Axes it drew on")
    assert ax.isinstance("matplotlib.axes.Axes"), (
        f"plot_attention must return a matplotlib Axes, got {ax.type_name}")
    if given_ax:
        assert ax.get_title() == "given", "when ax is given, plot_attention must draw into it and return it"
    return weights.detach(), q_tokens, k_tokens, ax, plt


@pytest.mark.parametrize("case", range(len(PLOT_CASES)), ids=PLOT_IDS)
def test_plot_attention_heatmap(student, device, case):
    weights, q_tokens, k_tokens, ax, plt = _plot(student, device, case)
    try:
        images = ax.images
        assert len(images) == 1, (
            f"the Axes should hold exactly one image (draw the weights with ax.imshow); it holds {len(images)}")
        image = images[0]
        data = image.get_array()
        assert isinstance(data, torch.Tensor), "the image does not hold an array of weights"
        assert_shape(data, (len(q_tokens), len(k_tokens)),
                     what="heatmap (rows must be the queries, columns the keys)")
        assert_close(data.double(), weights.double(), atol=1e-6, rtol=1e-5, what="heatmap values")
        assert image.colorbar is not None, "add a colorbar for the heatmap (ax.figure.colorbar(image, ax=ax))"
        assert len(ax.figure.axes) >= 2, "the figure should hold the heatmap and its colorbar"
    finally:
        plt.close("all")


def _centres(start: float, end: float, n: int) -> torch.Tensor:
    step = (end - start) / n
    return torch.tensor([start + (i + 0.5) * step for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("case", range(len(PLOT_CASES)), ids=PLOT_IDS)
def test_plot_attention_tick_labels(student, device, case):
    _, q_tokens, k_tokens, ax, plt = _plot(student, device, case)
    try:
        x_labels = [t.get_text() for t in ax.get_xticklabels()]
        y_labels = [t.get_text() for t in ax.get_yticklabels()]
        assert x_labels == list(k_tokens), (
            f"the x tick labels must be the key tokens, one per column, in order; got {x_labels}")
        assert y_labels == list(q_tokens), (
            f"the y tick labels must be the query tokens, one per row, in order; got {y_labels}")
        images = ax.images
        assert len(images) == 1, "draw the weights with ax.imshow"
        image = images[0]
        left, right, bottom, top = (float(e) for e in image.get_extent())
        first, last = (top, bottom) if image.origin == "upper" else (bottom, top)
        x_ticks = torch.as_tensor(ax.get_xticks(), dtype=torch.float64)
        y_ticks = torch.as_tensor(ax.get_yticks(), dtype=torch.float64)
        x_centres = _centres(left, right, len(k_tokens))
        y_centres = _centres(first, last, len(q_tokens))
        half_x, half_y = abs(right - left) / len(k_tokens) / 2, abs(top - bottom) / len(q_tokens) / 2
        assert x_ticks.shape == x_centres.shape and ((x_ticks - x_centres).abs() < half_x).all(), (
            "each key token's x tick must sit on its own column of the heatmap")
        assert y_ticks.shape == y_centres.shape and ((y_ticks - y_centres).abs() < half_y).all(), (
            "each query token's y tick must sit on its own row of the heatmap")
    finally:
        plt.close("all")
