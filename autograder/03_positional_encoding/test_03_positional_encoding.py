"""Hidden suite for lab 03: sinusoidal, learned, RoPE and ALiBi positions.

Oracles, computed here in the grader process:
- the sinusoidal table: the notebook's formula, in float64;
- RoPE: `transformers`' Llama `apply_rotary_pos_emb` (half-split, `rotate_half`) and GPT-J
  `apply_rotary_pos_emb` (interleaved, `rotate_every_two`), fed float64 cos/sin tables;
- ALiBi: BLOOM's `build_alibi_tensor` for the slopes and, under a causal mask, for the attention
  probabilities; the notebook's distance formula for the raw bias.
"""
from __future__ import annotations

import zlib

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb

from coursekit.testing import assert_close, assert_shape


# -- oracles --------------------------------------------------------------------------------------

def sinusoidal_oracle(max_len: int, d_model: int) -> torch.Tensor:
    """float64 (max_len, d_model), sines in even columns, cosines in odd columns."""
    p = torch.arange(max_len, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angles = p / 10000.0 ** (two_i / d_model)
    pe = torch.empty(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


def _rope_angles(positions: torch.Tensor, d: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))   # (d/2,)
    return positions.to(torch.float64)[..., None] * inv_freq                        # (..., d/2)


def rope_oracle(x: torch.Tensor, positions: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """RoPE through the `transformers` functions, in float64. x (..., L, d); positions broadcastable
    to x.shape[:-1]. Returns float64 of x's shape."""
    x = x.detach().cpu().to(torch.float64)
    d = x.shape[-1]
    lead = x.shape[:-1]
    pos = torch.broadcast_to(positions.cpu(), lead)
    L = lead[-1]
    xf = x.reshape(-1, L, d)                 # (N, L, d)
    pf = pos.reshape(-1, L)                  # (N, L)
    angles = _rope_angles(pf, d, base)       # (N, L, d/2)
    if interleaved:
        # GPT-J: tensor (batch, seq, heads, head_dim), sin/cos (batch, seq, head_dim/2)
        out = gptj_apply_rotary_pos_emb(xf[:, :, None, :], torch.sin(angles), torch.cos(angles))[:, :, 0, :]
    else:
        # Llama: q, k (batch, heads, seq, head_dim), cos/sin (batch, seq, head_dim) = cat(freqs, freqs)
        emb = torch.cat((angles, angles), dim=-1)
        out, _ = llama_apply_rotary_pos_emb(xf[:, None], xf[:, None], emb.cos(), emb.sin(), unsqueeze_dim=1)
        out = out[:, 0]
    return out.reshape(x.shape)


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """The slopes inside BLOOM's alibi tensor: alibi[h, 0, j] = slope_h * j, so column 1 holds them."""
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)
    return alibi.reshape(num_heads, 2)[:, 1]


def alibi_formula(num_heads: int, q_len: int, k_len: int) -> torch.Tensor:
    slopes = bloom_slopes(num_heads).to(torch.float64)
    qpos = torch.arange(q_len, dtype=torch.float64)[:, None] + (k_len - q_len)
    kpos = torch.arange(k_len, dtype=torch.float64)[None, :]
    return -slopes[:, None, None] * (qpos - kpos).abs()


def rope_atol(x: torch.Tensor, positions: torch.Tensor) -> float:
    """Accepts a float32 computation of the angles: their error grows like |p| * eps32, and it
    reaches the output multiplied by the size of the rotated pair."""
    scale = float(x.detach().abs().max()) * 2.0
    pmax = float(positions.abs().max()) if positions.numel() else 0.0
    if x.dtype == torch.float64:
        return 1e-12 * scale * (1.0 + pmax) + 1e-12
    return 5e-8 * scale * (1.0 + pmax) + 2e-6


# -- sinusoidal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len,d_model", [(1, 2), (10, 2), (50, 16), (100, 64), (257, 30), (2048, 128)])
def test_sinusoidal_table(student, max_len, d_model):
    pe = student.sinusoidal_encoding(max_len, d_model)
    what = f"sinusoidal_encoding({max_len}, {d_model})"
    assert isinstance(pe, torch.Tensor), f"{what} should return a torch.Tensor"
    assert_shape(pe, (max_len, d_model), what)
    assert pe.dtype == torch.float32, f"{what} should be float32 (it takes no tensor), got {pe.dtype}"
    assert pe.device.type == "cpu", f"{what} should be on the CPU (it takes no tensor)"
    expected = sinusoidal_oracle(max_len, d_model)
    # The tolerance grows with the position (a float32 angle p*omega carries an error ~ p * 1e-7).
    for start in range(0, max_len, 256):
        stop = min(max_len, start + 256)
        assert_close(pe[start:stop], expected[start:stop].float(), atol=2e-6 + 4e-7 * stop,
                     what=f"{what}, rows {start}..{stop - 1}")


@pytest.mark.parametrize("d_model", [1, 7, 33])
def test_sinusoidal_odd_d_model_raises(student, d_model):
    with pytest.raises(ValueError):
        student.sinusoidal_encoding(10, d_model)


@pytest.mark.parametrize("batch,seq_len,d_model,max_len,dtype", [
    pytest.param(2, 10, 16, 100, torch.float32, id="L10-d16-float32"),
    pytest.param(3, 1, 8, 5000, torch.float32, id="L1-d8-default_max_len"),
    pytest.param(1, 64, 32, 64, torch.float32, id="L64-exactly_max_len"),
    pytest.param(2, 37, 24, 500, torch.float64, id="L37-d24-float64"),
])
def test_sinusoidal_module_adds_table(student, device, batch, seq_len, d_model, max_len, dtype):
    torch.manual_seed(1)
    if max_len == 5000:
        enc = student.SinusoidalPositionalEncoding(d_model)
    else:
        enc = student.SinusoidalPositionalEncoding(d_model, max_len=max_len)
    enc.eval()
    enc.to(device)
    if dtype == torch.float64:
        enc.to(torch.float64)
    x = torch.randn(batch, seq_len, d_model, dtype=dtype, device=device)
    y = enc(x)
    expected = x.cpu().to(torch.float64) + sinusoidal_oracle(seq_len, d_model)
    assert isinstance(y, torch.Tensor), "forward should return a tensor"
    assert y.device.type == torch.device(device).type, "forward should return a tensor on the input's device"
    assert_close(y.cpu(), expected.to(dtype), atol=2e-6 + 4e-7 * seq_len,
                 what=f"SinusoidalPositionalEncoding({d_model}, max_len={max_len}) on x {tuple(x.shape)} {dtype}")


def test_sinusoidal_module_buffer_not_parameter(student):
    d_model, max_len = 12, 40
    enc = student.SinusoidalPositionalEncoding(d_model, max_len=max_len)
    params = dict(enc.named_parameters())
    assert len(params) == 0, (
        f"the sinusoidal table is fixed: the module should have no parameters, found {sorted(params)}")
    buffers = dict(enc.named_buffers())
    assert buffers, "the sinusoidal table should be registered as a buffer (register_buffer)"
    expected = sinusoidal_oracle(max_len, d_model)
    found = False
    for tensor in buffers.values():
        if isinstance(tensor, torch.Tensor) and tensor.numel() == max_len * d_model:
            if torch.allclose(tensor.detach().cpu().to(torch.float64).reshape(max_len, d_model), expected, atol=1e-4):
                found = True
    assert found, ("no buffer holds the (max_len, d_model) sinusoidal table; build it once in __init__ "
                   "with register_buffer")
    # Buffers follow .to(dtype): a float64 module must hold a float64 table.
    enc.to(torch.float64)
    dtypes = {t.dtype for t in dict(enc.named_buffers()).values() if isinstance(t, torch.Tensor)
              and t.numel() == max_len * d_model}
    assert dtypes == {torch.float64}, "after module.to(torch.float64) the table should be float64 (a buffer moves with the module)"


def test_sinusoidal_module_dropout(student):
    """Dropout comes after the sum: in train mode every output is 0 or (x + PE) / (1 - p)."""
    d_model, seq_len, p = 16, 50, 0.5
    student.lib("torch.manual_seed")(0)
    enc = student.SinusoidalPositionalEncoding(d_model, max_len=64, dropout=p)
    torch.manual_seed(2)
    x = torch.randn(4, seq_len, d_model)
    full = (x.to(torch.float64) + sinusoidal_oracle(seq_len, d_model))
    enc.eval()
    assert_close(enc(x), full.float(), atol=5e-5, what="eval mode (dropout must be off)")
    enc.train()
    y = enc(x).to(torch.float64)
    kept = y.abs() > 1e-6
    frac = kept.double().mean().item()
    assert 0.35 < frac < 0.65, f"with dropout=0.5 in train mode, about half the outputs should be zeroed (kept {frac:.2f})"
    assert_close(torch.where(kept, y, torch.zeros_like(y)), torch.where(kept, full / (1 - p), torch.zeros_like(y)),
                 atol=1e-4, what="the kept outputs in train mode (dropout applied to x + PE, scaled by 1/(1-p))",
                 check_dtype=False)


# -- learned --------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len,d_model,seq_len,dtype", [
    pytest.param(32, 8, 20, torch.float32, id="max32-L20-float32"),
    pytest.param(16, 4, 16, torch.float32, id="max16-L16-exactly_max_len"),
    pytest.param(100, 24, 1, torch.float32, id="max100-L1"),
    pytest.param(20, 12, 13, torch.float64, id="max20-L13-float64"),
])
def test_learned_adds_embedding(student, device, max_len, d_model, seq_len, dtype):
    mod = student.LearnedPositionalEmbedding(max_len, d_model)
    assert mod.embedding.isinstance("torch.nn.Embedding"), "the submodule `embedding` should be an nn.Embedding"
    params = dict(mod.named_parameters())
    assert set(params) == {"embedding.weight"}, (
        f"the parameters should be exactly embedding.weight, found {sorted(params)}")
    assert_shape(params["embedding.weight"], (max_len, d_model), "embedding.weight")
    torch.manual_seed(3)
    weight = torch.randn(max_len, d_model, dtype=torch.float64)
    mod.load_state_dict({"embedding.weight": weight.float()})
    mod.to(device)
    if dtype == torch.float64:
        mod.to(torch.float64)
        mod.load_state_dict({"embedding.weight": weight.to(device)})
    x = torch.randn(3, seq_len, d_model, dtype=dtype, device=device)
    y = mod(x)
    assert isinstance(y, torch.Tensor), "forward should return a tensor"
    w = weight if dtype == torch.float64 else weight.float().double()
    expected = x.cpu().to(torch.float64) + w[:seq_len]
    assert_close(y.cpu(), expected.to(dtype), atol=1e-5 if dtype == torch.float32 else 1e-12,
                 what=f"LearnedPositionalEmbedding({max_len}, {d_model}) on x {tuple(x.shape)} {dtype}")


@pytest.mark.parametrize("max_len,seq_len", [(8, 9), (16, 40)])
def test_learned_too_long_raises(student, max_len, seq_len):
    mod = student.LearnedPositionalEmbedding(max_len, 4)
    with pytest.raises(ValueError):
        mod(torch.randn(2, seq_len, 4))


def test_learned_gradients(student):
    """Gradients reach exactly the rows 0..L-1 of the table, summed over the batch."""
    max_len, d_model, seq_len = 12, 6, 7
    mod = student.LearnedPositionalEmbedding(max_len, d_model)
    torch.manual_seed(4)
    x = torch.randn(3, seq_len, d_model, requires_grad=True)
    g = torch.randn(3, seq_len, d_model)
    res = student.backward(mod, x, grad_outputs=g)
    grad = res.param_grads.get("embedding.weight")
    assert grad is not None, "no gradient reached embedding.weight"
    expected = torch.zeros(max_len, d_model)
    expected[:seq_len] = g.sum(0)
    assert_close(grad, expected, atol=1e-5, what="the gradient of embedding.weight")
    assert res.grads[0] is not None, "no gradient reached the input x"
    assert_close(res.grads[0], g, atol=1e-6, what="the gradient of x (the module adds to x)")


# -- RoPE -----------------------------------------------------------------------------------------

def _positions(kind: str, shape_lead: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    L = shape_lead[-1]
    if kind == "arange":
        return torch.arange(L)
    if kind == "offset":                 # a KV-cache step: positions start at 57
        return torch.arange(57, 57 + L)
    if kind == "far":                    # far from 0: tolerance grows, rotations are large
        return torch.arange(4000, 4000 + L)
    if kind == "gaps":                   # not contiguous, not sorted
        return torch.randperm(300, generator=gen)[:L]
    if kind == "per_batch":              # (B, 1, L): each sequence its own positions, shared by heads
        B = shape_lead[0]
        return torch.stack([torch.arange(L) * (b + 1) + 3 * b for b in range(B)])[:, None, :]
    if kind == "per_head":               # full (B, H, L)
        return torch.randint(0, 500, shape_lead, generator=gen)
    if kind == "left_pad":               # (B, L): left-padded batch, pads at position 0 (HF convention)
        B = shape_lead[0]
        out = torch.zeros(B, L, dtype=torch.long)
        for b in range(B):
            pad = b * 2
            out[b, pad:] = torch.arange(L - pad)
        return out
    raise ValueError(kind)


ROPE_CASES = [
    # (x shape, positions kind, dtype, base)
    ((9, 8), "arange", torch.float32, 10000.0),
    ((2, 7, 16), "offset", torch.float32, 10000.0),
    ((2, 3, 5, 32), "per_batch", torch.float32, 10000.0),
    ((2, 3, 6, 64), "gaps", torch.float32, 10000.0),
    ((2, 2, 3, 4, 8), "offset", torch.float32, 500000.0),     # extra leading dims, Llama-3 base
    ((2, 3, 6, 16), "per_head", torch.float32, 10000.0),
    ((3, 6, 8), "left_pad", torch.float32, 10000.0),
    ((1, 2, 5, 128), "far", torch.float32, 10000.0),
    ((2, 3, 6, 32), "gaps", torch.float64, 10000.0),
    ((2, 2, 5, 16), "per_batch", torch.float64, 10000.0),
]


def _rope_case(student, device, shape, kind, dtype, base, interleaved):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind, str(dtype))).encode()))
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    positions = _positions(kind, shape[:-1], gen)
    expected = rope_oracle(x, positions, base, interleaved)
    kwargs = {"interleaved": interleaved}
    if base != 10000.0:
        kwargs["base"] = base
    y = student.apply_rope(x.to(device), positions.to(device), **kwargs)
    name = "GPT-J interleaved" if interleaved else "Llama half-split"
    what = (f"apply_rope ({name}) on x {tuple(shape)} {str(dtype).replace('torch.', '')}, "
            f"positions {tuple(positions.shape)} ({kind})")
    assert isinstance(y, torch.Tensor), f"{what}: should return a tensor"
    assert y.device.type == torch.device(device).type, f"{what}: the result should be on the input's device"
    assert_close(y.cpu(), expected.to(dtype), atol=rope_atol(x, positions), what=what)


def _case_id(case) -> str:
    shape, kind, dtype, base = case
    return "x".join(map(str, shape)) + f"-{kind}-{str(dtype).replace('torch.', '')}" + (
        f"-base{int(base)}" if base != 10000.0 else "")


ROPE_IDS = [_case_id(c) for c in ROPE_CASES]


@pytest.mark.parametrize("shape,kind,dtype,base", ROPE_CASES, ids=ROPE_IDS)
def test_rope_llama_half_split(student, device, shape, kind, dtype, base):
    _rope_case(student, device, shape, kind, dtype, base, interleaved=False)


@pytest.mark.parametrize("shape,kind,dtype,base", ROPE_CASES, ids=ROPE_IDS)
def test_rope_gptj_interleaved(student, device, shape, kind, dtype, base):
    _rope_case(student, device, shape, kind, dtype, base, interleaved=True)


def test_rope_default_is_half_split(student):
    torch.manual_seed(5)
    x = torch.randn(2, 5, 8)
    positions = torch.arange(3, 8)
    y = student.apply_rope(x, positions)
    assert_close(y, rope_oracle(x, positions, 10000.0, interleaved=False).float(), atol=1e-5,
                 what="apply_rope(x, positions) with the default arguments (half-split, base 10000)")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rope_relative_property(student, interleaved):
    """<rope(q, m), rope(k, n)> depends only on m - n, is not constant in m - n, and rotations
    keep the norms. Checked on the student's own function (no oracle)."""
    torch.manual_seed(6)
    d, n_pairs = 32, 6
    q = torch.randn(n_pairs, 1, d, dtype=torch.float64)
    k = torch.randn(n_pairs, 1, d, dtype=torch.float64)
    offsets = [0, 1, 3, 10]
    shifts = [0, 5, 17, 250]
    scores = torch.empty(len(offsets), len(shifts), n_pairs, dtype=torch.float64)
    for a, off in enumerate(offsets):
        for b, s in enumerate(shifts):
            m = torch.tensor([s + off])
            n = torch.tensor([s])
            rq = student.apply_rope(q, m, interleaved=interleaved)
            rk = student.apply_rope(k, n, interleaved=interleaved)
            assert isinstance(rq, torch.Tensor) and isinstance(rk, torch.Tensor), "apply_rope should return tensors"
            assert_close(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5,
                         what="the norm of a rotated vector (RoPE is a rotation)")
            scores[a, b] = (rq * rk).sum(-1).reshape(n_pairs)
    # Same offset, different absolute positions: same score.
    for a, off in enumerate(offsets):
        # The tolerance accepts angles computed in float32 (an error ~ position * 1e-7 radians).
        assert_close(scores[a], scores[a, :1].expand_as(scores[a]), atol=2e-3,
                     what=f"the score <rope(q, n + {off}), rope(k, n)> as n varies (it should depend only on the offset)")
    # The offset must matter (an identity 'rotation' would pass the check above).
    spread = (scores[1:, 0] - scores[0, 0]).abs().max().item()
    assert spread > 1e-2, "the scores do not change with the offset m - n: the rotation seems to ignore the positions"


def test_rope_gradients(student):
    """RoPE is a rotation R, so the gradient of x is R^T g = apply_rope(g, -positions)."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    positions = torch.tensor([2, 3, 5, 8, 13])
    g = torch.randn(2, 3, 5, 16)
    res = student.backward(student.apply_rope, x, positions, grad_outputs=g)
    assert res.grads[0] is not None, "no gradient flows from apply_rope's output back to x"
    expected = rope_oracle(g, -positions, 10000.0, interleaved=False).float()
    assert_close(res.grads[0], expected, atol=1e-5, what="the gradient of apply_rope with respect to x")


# -- ALiBi ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_heads", list(range(1, 17)) + [24, 32])
def test_alibi_slopes_bloom(student, num_heads):
    slopes = student.alibi_slopes(num_heads)
    what = f"alibi_slopes({num_heads})"
    assert isinstance(slopes, torch.Tensor), f"{what} should return a torch.Tensor"
    assert_shape(slopes, (num_heads,), what)
    assert slopes.dtype == torch.float32, f"{what} should be float32 (it takes no tensor), got {slopes.dtype}"
    assert slopes.device.type == "cpu", f"{what} should be on the CPU"
    assert_close(slopes, bloom_slopes(num_heads), atol=0.0, rtol=2e-6, what=what)


@pytest.mark.parametrize("num_heads,q_len,k_len", [
    (8, 6, 6), (4, 1, 9), (6, 3, 10), (12, 5, 5), (3, 7, 7), (2, 6, 4), (16, 2, 33),
])
def test_alibi_bias_formula(student, num_heads, q_len, k_len):
    bias = student.alibi_bias(num_heads, q_len, k_len)
    what = f"alibi_bias({num_heads}, q_len={q_len}, k_len={k_len})"
    assert isinstance(bias, torch.Tensor), f"{what} should return a torch.Tensor"
    assert_shape(bias, (num_heads, q_len, k_len), what)
    assert bias.dtype == torch.float32, f"{what} should be float32 (it takes no tensor), got {bias.dtype}"
    assert bias.device.type == "cpu", f"{what} should be on the CPU"
    expected = alibi_formula(num_heads, q_len, k_len)
    assert_close(bias, expected.float(), atol=1e-6, rtol=2e-6, what=what)


@pytest.mark.parametrize("num_heads,q_len,k_len", [(8, 10, 10), (6, 4, 12), (12, 1, 20), (5, 9, 9)])
def test_alibi_softmax_matches_bloom(student, num_heads, q_len, k_len):
    """Under a causal (bottom-right) mask, softmax(scores + bias) equals BLOOM's softmax with
    slope * j: the two biases differ by a per-row constant."""
    bias = student.alibi_bias(num_heads, q_len, k_len)
    assert isinstance(bias, torch.Tensor), "alibi_bias should return a torch.Tensor"
    assert_shape(bias, (num_heads, q_len, k_len), f"alibi_bias({num_heads}, {q_len}, {k_len})")
    gen = torch.Generator().manual_seed(num_heads * 1000 + q_len * 10 + k_len)
    scores = torch.randn(2, num_heads, q_len, k_len, generator=gen, dtype=torch.float64)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    bloom = build_alibi_tensor(torch.ones(1, k_len, dtype=torch.long), num_heads, torch.float32)
    bloom = bloom.reshape(1, num_heads, 1, k_len).to(torch.float64)
    expected = torch.softmax((scores + bloom).masked_fill(~causal, float("-inf")), dim=-1)
    actual = torch.softmax((scores + bias.to(torch.float64)).masked_fill(~causal, float("-inf")), dim=-1)
    assert_close(actual, expected, atol=1e-5,
                 what=f"softmax(scores + alibi_bias({num_heads}, {q_len}, {k_len})) under a causal mask, "
                      "compared with BLOOM's ALiBi")
