"""Hidden suite for lab 02: the encoder block, stacked.

Oracles, computed here in the grader's process, in float64 on the CPU:
- `torch.nn.TransformerEncoderLayer`, `torch.nn.TransformerEncoder` (built with
  `enable_nested_tensor=False`) and `torch.nn.TransformerDecoderLayer`, all `batch_first=True`, with
  every parameter (LayerNorm gains and all biases included) drawn at random here and copied into the
  student's module under the contract's names;
- `torch.nn.functional` (`linear`, `relu`, exact `gelu`) for the feed-forward network.

The oracles run with autograd enabled and parameters that require grad, so PyTorch never takes its
fused inference fast path. Masks follow the contract (True = may attend) on the student's side and
are inverted for PyTorch (True = blocked); padding masks go to PyTorch as key-padding masks, other
shapes as (L_q, L_k) or (B * num_heads, L_q, L_k) attention masks. No test mask leaves a query row
with every key masked.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx.experimental.symbolic_shapes  # noqa: F401  (see below)
import torch.nn as nn
import torch.nn.functional as F

from coursekit.testing import assert_close, gen, randn, randomize_

# nn.MultiheadAttention's key-padding check (torch._check_with) imports torch's symbolic shapes,
# and sympy with them, on its first call: 0.4 s of every submission's worker, where an import at
# the top is done once per batch (the zygote runs a suite's imports before forking workers).

F64 = torch.float64
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float64: dict(atol=1e-9, rtol=1e-7),
}
GRAD_TOL = dict(atol=1e-8, rtol=1e-6)  # float64


# -- helpers ----------------------------------------------------------------------------------------


def contract_names(torch_names) -> dict[str, tuple[str, int | None]]:
    """contract name -> (PyTorch name, chunk of in_proj or None)."""
    mapping = {}
    for name in torch_names:
        match = re.fullmatch(r"(.*)(self_attn|multihead_attn)\.in_proj_(weight|bias)", name)
        if match:
            prefix, attn, kind = match.groups()
            attn = "cross_attn" if attn == "multihead_attn" else attn
            for i, part in enumerate("qkv"):
                mapping[f"{prefix}{attn}.w_{part}.{kind}"] = (name, i)
            continue
        ours = name.replace("multihead_attn.", "cross_attn.").replace(".out_proj.", ".w_o.")
        ours = re.sub(r"(^|\.)(linear[12])\.", r"\1ffn.\2.", ours)
        mapping[ours] = (name, None)
    return mapping


def to_contract(torch_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PyTorch's parameters (or their gradients) under the contract's names."""
    out = {}
    for ours, (theirs, chunk) in contract_names(torch_tensors).items():
        tensor = torch_tensors[theirs]
        out[ours] = tensor if chunk is None else tensor.chunk(3)[chunk]
    return {k: v.detach().clone() for k, v in out.items()}


def torch_encoder_layer(g, d_model, num_heads, d_ff, activation="relu", norm_first=False,
                        dropout=0.0, layer_norm_eps=1e-5):
    layer = nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=dropout, activation=activation,
                                       layer_norm_eps=layer_norm_eps, batch_first=True,
                                       norm_first=norm_first, dtype=F64)
    return randomize_(layer, g).eval()


def torch_encoder(g, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False, dropout=0.0):
    layer = nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=dropout, activation=activation,
                                       batch_first=True, norm_first=norm_first, dtype=F64)
    norm = nn.LayerNorm(d_model, dtype=F64) if norm_first else None
    stack = nn.TransformerEncoder(layer, num_layers, norm=norm, enable_nested_tensor=False)
    return randomize_(stack, g).eval()


def torch_decoder_layer(g, d_model, num_heads, d_ff, activation="relu", norm_first=False, dropout=0.0):
    layer = nn.TransformerDecoderLayer(d_model, num_heads, d_ff, dropout=dropout, activation=activation,
                                       batch_first=True, norm_first=norm_first, dtype=F64)
    return randomize_(layer, g).eval()


def check_names(handle, oracle: nn.Module, what: str) -> None:
    names = {name for name, _ in handle.named_parameters()}
    expected = set(contract_names(dict(oracle.named_parameters())))
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    assert not missing and not unexpected, (
        f"{what}: the parameter names differ from the contract; missing {missing[:6]}, "
        f"unexpected {unexpected[:6]}")


def load_student(handle, oracle: nn.Module, device: str, dtype=F64, what: str = "the module"):
    """Check the names, copy the oracle's weights in (rounded to dtype), move to device, eval mode."""
    check_names(handle, oracle, what)
    handle.to(dtype)
    handle.load_state_dict({k: v.to(dtype) for k, v in to_contract(oracle.state_dict()).items()})
    handle.to(device)
    handle.eval()
    return handle


def check(actual, expected64: torch.Tensor, dtype, what: str) -> None:
    assert isinstance(actual, torch.Tensor), (
        f"{what} should be one tensor, got {getattr(actual, 'type_name', type(actual).__name__)}")
    assert_close(actual.cpu(), expected64.detach().to(dtype), **TOL[dtype], what=what)


def no_empty_rows(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Give every query row of a boolean mask at least one key it may attend to."""
    lk = mask.shape[-1]
    pick = torch.randint(lk, mask.shape[:-1], generator=g)
    forced = F.one_hot(pick, lk).bool()
    return torch.where(mask.any(-1, keepdim=True), mask, forced)


def lengths_mask(g, batch: int, length: int) -> torch.Tensor:
    """(B, L) True on the first len_b positions, with the first sequence full and none empty."""
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    return torch.arange(length)[None, :] < lengths[:, None]


def attention_mask(kind: str, g, B: int, H: int, Lq: int, Lk: int):
    """(student's mask, PyTorch's attn_mask, PyTorch's key_padding_mask) for one kind of mask."""
    if kind == "none":
        return None, None, None
    if kind == "causal":
        mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        return mask, ~mask, None
    if kind in ("padding", "padding_float"):
        keep = lengths_mask(g, B, Lk)
        mask = keep[:, None, None, :]
        return (mask.to(F64) if kind == "padding_float" else mask), None, ~keep
    if kind == "query_key":  # (Lq, Lk), one pattern for the whole batch
        mask = no_empty_rows(torch.rand(Lq, Lk, generator=g) < 0.6, g)
        return mask, ~mask, None
    if kind == "per_example":  # (B, 1, Lq, Lk)
        mask = no_empty_rows(torch.rand(B, 1, Lq, Lk, generator=g) < 0.6, g)
    elif kind == "per_head":  # (B, H, Lq, Lk)
        mask = no_empty_rows(torch.rand(B, H, Lq, Lk, generator=g) < 0.6, g)
    else:
        raise ValueError(kind)
    return mask, (~mask).expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk), None


def on(device: str, value):
    return None if value is None else value.to(device)


def leaf(value: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A fresh leaf that requires grad (never the grader's own tensor, which .to() may return as is)."""
    return value.detach().clone().to(device).requires_grad_()


def encoder_layer_case(student, device, *, seed, B, L, d_model, num_heads, d_ff, activation="relu",
                       norm_first=False, mask_kind="none", dtype=F64, layer_norm_eps=None, dropout=0.0):
    """Build the oracle and the student's layer with the same weights; return both outputs."""
    g = gen(seed)
    eps_kw = {} if layer_norm_eps is None else {"layer_norm_eps": layer_norm_eps}
    oracle = torch_encoder_layer(g, d_model, num_heads, d_ff, activation, norm_first, dropout, **eps_kw)
    if dtype != F64:  # both sides use exactly the rounded weights
        with torch.no_grad():
            for p in oracle.parameters():
                p.copy_(p.to(dtype).to(F64))
    h = student.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=dropout, activation=activation,
                                        norm_first=norm_first, **eps_kw)
    load_student(h, oracle, device, dtype, "TransformerEncoderLayer")
    x = randn(g, B, L, d_model).to(dtype).to(F64)
    mask, attn_mask, kpm = attention_mask(mask_kind, g, B, num_heads, L, L)
    y = h(x.to(dtype).to(device), on(device, mask))
    expected = oracle(x, src_mask=attn_mask, src_key_padding_mask=kpm)
    return y, expected


# -- PositionwiseFeedForward ------------------------------------------------------------------------

FFN_CASES = [
    # (activation or None for the default, B, L, d_model, d_ff, input scale)
    (None, 2, 5, 16, 64, 1.0),
    ("relu", 3, 7, 24, 40, 2.0),
    ("gelu", 2, 5, 16, 64, 1.0),
    ("gelu", 1, 1, 8, 32, 3.0),
    ("gelu", 4, 3, 32, 128, 2.0),
]


@pytest.mark.parametrize("activation,B,L,d_model,d_ff,scale", FFN_CASES)
def test_ffn_matches_reference(student, device, activation, B, L, d_model, d_ff, scale):
    g = gen(100 + B * L + d_ff)
    w1, b1 = randn(g, d_ff, d_model) / d_model ** 0.5, randn(g, d_ff, scale=0.5)
    w2, b2 = randn(g, d_model, d_ff) / d_ff ** 0.5, randn(g, d_model, scale=0.5)
    x = randn(g, B, L, d_model, scale=scale)
    kwargs = {} if activation is None else {"activation": activation}
    h = student.PositionwiseFeedForward(d_model, d_ff, **kwargs)
    names = {name for name, _ in h.named_parameters()}
    expected_names = {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    assert names == expected_names, (
        f"PositionwiseFeedForward should have exactly the parameters {sorted(expected_names)}, "
        f"found {sorted(names)}")
    h.to(F64)
    h.load_state_dict({"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2})
    h.to(device)
    h.eval()
    act = F.gelu if activation == "gelu" else F.relu  # F.gelu: the exact (erf) GELU
    expected = F.linear(act(F.linear(x, w1, b1)), w2, b2)
    y = h(x.to(device))
    check(y, expected, F64, f"PositionwiseFeedForward(activation={activation or 'default'}) output")


@pytest.mark.parametrize("activation", ["tanh", "silu", "gelu_tanh"])
def test_ffn_rejects_unknown_activation(student, activation):
    with pytest.raises(ValueError):
        student.PositionwiseFeedForward(8, 16, activation=activation)


# -- parameter names --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["encoder_layer", "encoder_post_ln", "encoder_pre_ln", "decoder_layer"])
def test_parameter_names(student, which):
    g = gen(7)
    if which == "encoder_layer":
        oracle = torch_encoder_layer(g, 16, 4, 32)
        h = student.TransformerEncoderLayer(16, 4, 32)
        what = "TransformerEncoderLayer"
    elif which == "decoder_layer":
        oracle = torch_decoder_layer(g, 16, 4, 32)
        h = student.TransformerDecoderLayer(16, 4, 32)
        what = "TransformerDecoderLayer"
    else:
        norm_first = which == "encoder_pre_ln"
        oracle = torch_encoder(g, 2, 16, 4, 32, norm_first=norm_first)
        h = student.TransformerEncoder(num_layers=2, d_model=16, num_heads=4, d_ff=32, norm_first=norm_first)
        what = f"TransformerEncoder(norm_first={norm_first})"
    check_names(h, oracle, what)
    params = {name: p for name, p in h.named_parameters()}
    for name, p in to_contract(dict(oracle.named_parameters())).items():
        assert tuple(params[name].shape) == tuple(p.shape), (
            f"{what}: parameter {name} has shape {tuple(params[name].shape)}, expected {tuple(p.shape)}")


# -- TransformerEncoderLayer ------------------------------------------------------------------------

LAYER_SHAPES = [
    # (B, L, d_model, num_heads, d_ff)
    (2, 5, 16, 4, 32),
    (3, 7, 24, 3, 40),
    (1, 1, 8, 2, 16),
]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=["small", "odd_heads", "one_token"])
def test_encoder_layer_matches_pytorch(student, device, norm_first, activation, shape):
    B, L, d_model, num_heads, d_ff = shape
    y, expected = encoder_layer_case(student, device, seed=200 + B * L + d_ff, B=B, L=L, d_model=d_model,
                                     num_heads=num_heads, d_ff=d_ff, activation=activation,
                                     norm_first=norm_first)
    check(y, expected, F64, f"TransformerEncoderLayer(norm_first={norm_first}, activation={activation!r}) "
                            f"output for x of shape {(B, L, d_model)}")


def test_encoder_layer_default_arguments(student, device):
    g = gen(250)
    oracle = torch_encoder_layer(g, 16, 2, 48)  # relu, Post-LN, eps 1e-5
    h = load_student(student.TransformerEncoderLayer(16, 2, 48), oracle, device,
                     what="TransformerEncoderLayer")
    x = randn(g, 2, 6, 16)
    check(h(x.to(device)), oracle(x), F64,
          "TransformerEncoderLayer(d_model, num_heads, d_ff) with the default arguments (relu, Post-LN)")


MASK_KINDS = ["causal", "padding", "padding_float", "query_key", "per_example", "per_head"]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_encoder_layer_masks(student, device, norm_first, mask_kind):
    y, expected = encoder_layer_case(student, device, seed=300 + MASK_KINDS.index(mask_kind), B=3, L=6,
                                     d_model=16, num_heads=4, d_ff=32, activation="gelu",
                                     norm_first=norm_first, mask_kind=mask_kind)
    check(y, expected, F64, f"TransformerEncoderLayer(norm_first={norm_first}) output with a {mask_kind} mask")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_layer_layer_norm_eps(student, device, norm_first):
    y, expected = encoder_layer_case(student, device, seed=350, B=2, L=5, d_model=16, num_heads=4, d_ff=32,
                                     norm_first=norm_first, layer_norm_eps=0.5)
    check(y, expected, F64, f"TransformerEncoderLayer(norm_first={norm_first}, layer_norm_eps=0.5) output")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_gradients(student, device, norm_first, activation):
    g = gen(400 + 2 * norm_first + (activation == "gelu"))
    B, L, d_model, num_heads, d_ff = 2, 5, 16, 4, 32
    oracle = torch_encoder_layer(g, d_model, num_heads, d_ff, activation, norm_first)
    h = student.TransformerEncoderLayer(d_model, num_heads, d_ff, activation=activation, norm_first=norm_first)
    load_student(h, oracle, device, what="TransformerEncoderLayer")
    x = randn(g, B, L, d_model)
    mask, attn_mask, kpm = attention_mask("padding", g, B, num_heads, L, L)
    grad_out = randn(g, B, L, d_model)
    result = student.backward(h, leaf(x, device), mask.to(device), grad_outputs=grad_out.to(device))

    x_ref = leaf(x)
    (oracle(x_ref, src_key_padding_mask=kpm) * grad_out).sum().backward()
    check(result.output, oracle(x, src_key_padding_mask=kpm), F64, "TransformerEncoderLayer output")
    compare_grads(result, [x_ref.grad], oracle, "TransformerEncoderLayer", ["x"])


def compare_grads(result, input_grads, oracle: nn.Module, what: str, input_names) -> None:
    for name, grad, expected in zip(input_names, result.grads, input_grads):
        assert grad is not None, f"{what}: no gradient reached the input {name}"
        assert_close(grad.cpu(), expected, **GRAD_TOL, what=f"{what}: gradient with respect to {name}")
    expected_params = to_contract({n: p.grad for n, p in oracle.named_parameters()})
    for name, expected in sorted(expected_params.items()):
        grad = result.param_grads.get(name)
        assert grad is not None, f"{what}: no gradient reached the parameter {name}"
        assert_close(grad.cpu(), expected, **GRAD_TOL, what=f"{what}: gradient of {name}")


# -- TransformerEncoder -----------------------------------------------------------------------------

STACK_CASES = [
    # (num_layers, B, L, d_model, num_heads, d_ff, mask kind)
    (6, 2, 5, 16, 4, 32, "none"),
    (6, 3, 6, 16, 2, 24, "padding"),
    (2, 2, 7, 24, 3, 48, "causal"),
    (1, 2, 4, 8, 2, 16, "padding"),
]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("case", STACK_CASES, ids=["six_layers", "six_layers_padding", "two_layers_causal",
                                                   "one_layer"])
def test_encoder_stack_matches_pytorch(student, device, norm_first, activation, case):
    num_layers, B, L, d_model, num_heads, d_ff, mask_kind = case
    g = gen(500 + num_layers * 10 + L + 2 * norm_first + (activation == "gelu"))
    oracle = torch_encoder(g, num_layers, d_model, num_heads, d_ff, activation, norm_first)
    h = student.TransformerEncoder(num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_ff=d_ff,
                                   activation=activation, norm_first=norm_first)
    what = f"TransformerEncoder(num_layers={num_layers}, norm_first={norm_first}, activation={activation!r})"
    load_student(h, oracle, device, what=what)
    x = randn(g, B, L, d_model)
    mask, attn_mask, kpm = attention_mask(mask_kind, g, B, num_heads, L, L)
    expected = oracle(x, mask=attn_mask, src_key_padding_mask=kpm)
    check(h(x.to(device), on(device, mask)), expected, F64, f"{what} output ({mask_kind} mask)")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_final_norm(student, device, norm_first):
    d_model = 16
    h = student.TransformerEncoder(num_layers=3, d_model=d_model, num_heads=4, d_ff=32, norm_first=norm_first)
    norm = h.norm
    names = {name for name, _ in h.named_parameters()}
    if not norm_first:
        assert norm is None, "a Post-LN TransformerEncoder must have norm = None (its last layer already ends on a LayerNorm)"
        assert not any(n.startswith("norm.") for n in names), "a Post-LN TransformerEncoder has no final norm parameters"
        return
    assert norm is not None and hasattr(norm, "isinstance") and norm.isinstance("torch.nn.LayerNorm"), (
        "a Pre-LN TransformerEncoder must end with a final nn.LayerNorm in its attribute `norm`")
    assert tuple(norm.normalized_shape) == (d_model,), "the final LayerNorm should normalise over d_model"
    assert {"norm.weight", "norm.bias"} <= names, "the final LayerNorm's parameters should be norm.weight and norm.bias"
    # The final norm is applied once, after the last layer: load random weights and compare.
    g = gen(600)
    oracle = torch_encoder(g, 3, d_model, 4, 32, norm_first=True)
    load_student(h, oracle, device, what="TransformerEncoder(norm_first=True)")
    x = randn(g, 2, 5, d_model, scale=2.0)
    check(h(x.to(device)), oracle(x), F64, "Pre-LN TransformerEncoder output (final norm)")


def test_encoder_defaults(student):
    h = student.TransformerEncoder()
    layers = h.layers
    assert hasattr(layers, "isinstance") and layers.isinstance("torch.nn.ModuleList"), (
        "TransformerEncoder.layers should be an nn.ModuleList")
    assert len(layers) == 6, f"TransformerEncoder() should have 6 layers by default, found {len(layers)}"
    first = layers[0]
    assert (first.ffn.linear1.in_features, first.ffn.linear1.out_features) == (512, 2048), (
        "TransformerEncoder() should default to d_model=512 and d_ff=2048")
    assert tuple(first.norm1.normalized_shape) == (512,), "TransformerEncoder() should default to d_model=512"
    assert first.self_attn.num_heads == 8, "TransformerEncoder() should default to num_heads=8"
    assert h.norm is None, "TransformerEncoder() defaults to Post-LN, which has no final norm"


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_stack_gradients(student, device, norm_first):
    g = gen(700 + norm_first)
    B, L, d_model, num_heads, d_ff = 2, 5, 16, 4, 32
    oracle = torch_encoder(g, 3, d_model, num_heads, d_ff, "gelu", norm_first)
    h = student.TransformerEncoder(num_layers=3, d_model=d_model, num_heads=num_heads, d_ff=d_ff,
                                   activation="gelu", norm_first=norm_first)
    what = f"TransformerEncoder(num_layers=3, norm_first={norm_first})"
    load_student(h, oracle, device, what=what)
    x = randn(g, B, L, d_model)
    mask, attn_mask, _ = attention_mask("causal", g, B, num_heads, L, L)
    grad_out = randn(g, B, L, d_model)
    result = student.backward(h, leaf(x, device), mask.to(device), grad_outputs=grad_out.to(device))
    x_ref = leaf(x)
    (oracle(x_ref, mask=attn_mask) * grad_out).sum().backward()
    compare_grads(result, [x_ref.grad], oracle, what, ["x"])


# -- TransformerDecoderLayer ------------------------------------------------------------------------

DECODER_SHAPES = [
    # (B, Lq, Lk, d_model, num_heads, d_ff)
    (2, 5, 7, 16, 4, 32),
    (3, 6, 3, 24, 3, 40),
    (1, 1, 4, 8, 2, 16),
]


def decoder_case(student, device, *, seed, B, Lq, Lk, d_model, num_heads, d_ff, activation="relu",
                 norm_first=False, tgt_kind="causal", memory_kind="padding", dtype=F64, dropout=0.0):
    g = gen(seed)
    oracle = torch_decoder_layer(g, d_model, num_heads, d_ff, activation, norm_first, dropout)
    if dtype != F64:
        with torch.no_grad():
            for p in oracle.parameters():
                p.copy_(p.to(dtype).to(F64))
    h = student.TransformerDecoderLayer(d_model, num_heads, d_ff, dropout=dropout, activation=activation,
                                        norm_first=norm_first)
    load_student(h, oracle, device, dtype, "TransformerDecoderLayer")
    x = randn(g, B, Lq, d_model).to(dtype).to(F64)
    memory = randn(g, B, Lk, d_model).to(dtype).to(F64)
    tgt_mask, tgt_attn, tgt_kpm = attention_mask(tgt_kind, g, B, num_heads, Lq, Lq)
    mem_mask, mem_attn, mem_kpm = attention_mask(memory_kind, g, B, num_heads, Lq, Lk)
    y = h(x.to(dtype).to(device), memory.to(dtype).to(device), on(device, tgt_mask), on(device, mem_mask))
    expected = oracle(x, memory, tgt_mask=tgt_attn, memory_mask=mem_attn, tgt_key_padding_mask=tgt_kpm,
                      memory_key_padding_mask=mem_kpm)
    return y, expected


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape", DECODER_SHAPES, ids=["longer_memory", "shorter_memory", "one_token"])
def test_decoder_layer_matches_pytorch(student, device, norm_first, activation, shape):
    B, Lq, Lk, d_model, num_heads, d_ff = shape
    y, expected = decoder_case(student, device, seed=800 + B * Lq + Lk + 2 * norm_first, B=B, Lq=Lq, Lk=Lk,
                               d_model=d_model, num_heads=num_heads, d_ff=d_ff, activation=activation,
                               norm_first=norm_first)
    check(y, expected, F64, f"TransformerDecoderLayer(norm_first={norm_first}, activation={activation!r}) "
                            f"output for x {(B, Lq, d_model)} and memory {(B, Lk, d_model)} "
                            "(causal tgt_mask, padding memory_mask)")


DECODER_MASKS = [
    # (tgt_mask kind, memory_mask kind)
    ("none", "none"),          # the layer must not build a causal mask of its own
    ("causal", "none"),
    ("per_head", "query_key"),
    ("padding", "per_example"),
]


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("masks", DECODER_MASKS, ids=["-".join(m) for m in DECODER_MASKS])
def test_decoder_layer_masks(student, device, norm_first, masks):
    tgt_kind, memory_kind = masks
    y, expected = decoder_case(student, device, seed=900 + DECODER_MASKS.index(masks), B=3, Lq=5, Lk=6,
                               d_model=16, num_heads=4, d_ff=32, activation="gelu", norm_first=norm_first,
                               tgt_kind=tgt_kind, memory_kind=memory_kind)
    check(y, expected, F64, f"TransformerDecoderLayer(norm_first={norm_first}) output with tgt_mask "
                            f"{tgt_kind} and memory_mask {memory_kind}")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_layer_gradients(student, device, norm_first):
    g = gen(1000 + norm_first)
    B, Lq, Lk, d_model, num_heads, d_ff = 2, 4, 6, 16, 4, 32
    oracle = torch_decoder_layer(g, d_model, num_heads, d_ff, "gelu", norm_first)
    h = student.TransformerDecoderLayer(d_model, num_heads, d_ff, activation="gelu", norm_first=norm_first)
    what = f"TransformerDecoderLayer(norm_first={norm_first})"
    load_student(h, oracle, device, what=what)
    x, memory = randn(g, B, Lq, d_model), randn(g, B, Lk, d_model)
    tgt_mask, tgt_attn, _ = attention_mask("causal", g, B, num_heads, Lq, Lq)
    mem_mask, _, mem_kpm = attention_mask("padding", g, B, num_heads, Lq, Lk)
    grad_out = randn(g, B, Lq, d_model)
    result = student.backward(h, leaf(x, device), leaf(memory, device),
                              tgt_mask.to(device), mem_mask.to(device), grad_outputs=grad_out.to(device))
    x_ref, m_ref = leaf(x), leaf(memory)
    (oracle(x_ref, m_ref, tgt_mask=tgt_attn, memory_key_padding_mask=mem_kpm) * grad_out).sum().backward()
    compare_grads(result, [x_ref.grad, m_ref.grad], oracle, what, ["x", "memory"])


# -- float32 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("which", ["encoder_layer", "encoder", "decoder_layer"])
def test_float32(student, device, which, norm_first):
    dtype = torch.float32
    if which == "encoder_layer":
        y, expected = encoder_layer_case(student, device, seed=1100, B=2, L=6, d_model=32, num_heads=4,
                                         d_ff=64, activation="gelu", norm_first=norm_first,
                                         mask_kind="causal", dtype=dtype)
    elif which == "decoder_layer":
        y, expected = decoder_case(student, device, seed=1101, B=2, Lq=5, Lk=7, d_model=32, num_heads=4,
                                   d_ff=64, activation="gelu", norm_first=norm_first, dtype=dtype)
    else:
        g = gen(1102)
        oracle = torch_encoder(g, 6, 32, 4, 64, "gelu", norm_first)
        with torch.no_grad():
            for p in oracle.parameters():
                p.copy_(p.to(dtype).to(F64))
        h = student.TransformerEncoder(num_layers=6, d_model=32, num_heads=4, d_ff=64, activation="gelu",
                                       norm_first=norm_first)
        load_student(h, oracle, device, dtype, "TransformerEncoder")
        x = randn(g, 2, 6, 32).to(dtype)
        y, expected = h(x.to(device)), oracle(x.to(F64))
    check(y, expected, dtype, f"{which} (norm_first={norm_first}) output in float32")


# -- dropout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["encoder_layer", "encoder", "decoder_layer"])
def test_dropout_off_in_eval(student, device, which):
    g = gen(1200)
    d_model, num_heads, d_ff, p = 16, 4, 32, 0.3
    if which == "encoder_layer":
        oracle = torch_encoder_layer(g, d_model, num_heads, d_ff, dropout=p)
        h = student.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=p)
    elif which == "encoder":
        oracle = torch_encoder(g, 2, d_model, num_heads, d_ff, norm_first=True, dropout=p)
        h = student.TransformerEncoder(num_layers=2, d_model=d_model, num_heads=num_heads, d_ff=d_ff,
                                       dropout=p, norm_first=True)
    else:
        oracle = torch_decoder_layer(g, d_model, num_heads, d_ff, dropout=p)
        h = student.TransformerDecoderLayer(d_model, num_heads, d_ff, dropout=p)
    load_student(h, oracle, device, what=which)
    args = [randn(g, 2, 5, d_model)] + ([randn(g, 2, 4, d_model)] if which == "decoder_layer" else [])
    expected = oracle(*args)
    dev_args = [a.to(device) for a in args]
    first, second = h(*dev_args), h(*dev_args)
    check(first, expected, F64, f"{which} output in eval mode with dropout={p}")
    check(second, expected, F64, f"{which} output in eval mode with dropout={p}, second call")
    h.train()
    h(*dev_args)
    h.eval()
    check(h(*dev_args), expected, F64, f"{which} output after .train() then .eval() with dropout={p}")


TRAIN_CASES = [("ffn", False), ("encoder_layer", False), ("encoder_layer", True),
               ("decoder_layer", False), ("decoder_layer", True)]


@pytest.mark.parametrize("which,norm_first", TRAIN_CASES,
                         ids=["ffn", "encoder_layer_post_ln", "encoder_layer_pre_ln", "decoder_layer_post_ln",
                              "decoder_layer_pre_ln"])
def test_dropout_in_training(student, device, which, norm_first):
    """In training mode dropout is on; with p = 1 every dropout outputs zeros, which pins down where
    the dropouts sit (after the FFN's activation, on each sublayer's output) without randomness."""
    g = gen(1300 + TRAIN_CASES.index((which, norm_first)))
    d_model, num_heads, d_ff = 16, 4, 32
    x = randn(g, 2, 5, d_model)
    memory = randn(g, 2, 4, d_model)
    if which == "ffn":
        w1, b1 = randn(g, d_ff, d_model), randn(g, d_ff)
        w2, b2 = randn(g, d_model, d_ff), randn(g, d_model)
        outputs = {}
        for p in (1.0, 0.5):
            h = student.PositionwiseFeedForward(d_model, d_ff, dropout=p)
            h.to(F64)
            h.load_state_dict({"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2,
                               "linear2.bias": b2})
            h.to(device)
            h.train()
            outputs[p] = (h(x.to(device)), h(x.to(device)))
        # Dropout after the activation leaves only linear2's bias when everything is dropped.
        check(outputs[1.0][0], b2.expand(2, 5, d_model), F64,
              "PositionwiseFeedForward output in training mode with dropout=1.0")
        a, b = outputs[0.5]
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not torch.equal(a.cpu(), b.cpu()), (
            "PositionwiseFeedForward(dropout=0.5) in training mode gave the same output twice: dropout is not applied")
        return
    results = {}
    for p in (1.0, 0.3):
        if which == "encoder_layer":
            oracle = torch_encoder_layer(gen(1350), d_model, num_heads, d_ff, norm_first=norm_first, dropout=p)
            h = student.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=p, norm_first=norm_first)
            args = [x]
        else:
            oracle = torch_decoder_layer(gen(1350), d_model, num_heads, d_ff, norm_first=norm_first, dropout=p)
            h = student.TransformerDecoderLayer(d_model, num_heads, d_ff, dropout=p, norm_first=norm_first)
            args = [x, memory]
        load_student(h, oracle, device, what=which)
        h.train()
        oracle.train()
        dev_args = [a.to(device) for a in args]
        results[p] = (h(*dev_args), h(*dev_args), oracle(*args) if p == 1.0 else None)
    y, _, expected = results[1.0]
    check(y, expected, F64, f"{which} (norm_first={norm_first}) output in training mode with dropout=1.0 "
                            "(every dropped sublayer output is zero)")
    a, b, _ = results[0.3]
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not torch.equal(a.cpu(), b.cpu()), (
        f"{which}(dropout=0.3) in training mode gave the same output twice: dropout is not applied")
