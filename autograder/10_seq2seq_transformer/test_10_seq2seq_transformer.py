"""Hidden suite for lab 10: the full Transformer, an encoder-decoder for sequence-to-sequence tasks.

Oracles, all computed here in the grader's process, in float64 on the CPU:
- masks: `nn.Transformer.generate_square_subsequent_mask` and the key-padding masks `ids == pad_id` that
  `nn.Transformer` takes, inverted to the course's convention (True = may attend);
- `TransformerDecoder`: `nn.TransformerDecoder(nn.TransformerDecoderLayer(batch_first=True, norm_first=...),
  num_layers, norm=LayerNorm if norm_first else None)`, every parameter random (LayerNorms away from 1/0),
  copied into the student's module under the contract's names;
- `Seq2SeqTransformer`: `nn.Embedding`s, the sinusoidal formula in float64 (`x * sqrt(d_model) + PE`), then
  `nn.Transformer` built from custom stacks (final norms only for Pre-LN) called with the causal
  `tgt_mask`, `tgt_is_causal=True` and the three key-padding masks, then `nn.Linear`; parameters require
  grad so that PyTorch takes its documented (non-fused) path; gradients from autograd on the same model;
- `seq2seq_loss`: `F.cross_entropy(..., ignore_index=pad_id, label_smoothing=eps)` and its gradient;
- `train_step`: the same loop written here with `F.cross_entropy` and `clip_grad_norm_`, run on an
  `nn.Transformer`-based stand-in (embeddings, `nn.Transformer`, `nn.Linear`) with identical weights;
- `greedy_decode`: `transformers`' `BartForConditionalGeneration.generate` (greedy, `max_length`,
  `decoder_start_token_id`, `eos_token_id`, `pad_token_id`) on tiny seeded float64 BART models, and, for an
  `nn.Transformer` stand-in with 2 decoder layers that honours `tgt_mask`, the definition (the arg-max of
  the full decoder pass on the prefix, with the contract's masks), computed here. The models the student's
  code receives are built in the student's process from library objects only: the same modules (weights
  loaded from the oracle's state dict) wired by `torch.fx` graphs into the protocol `encode(src, src_mask)`,
  `decode(tgt, memory, src_mask, tgt_mask)`, `generator(hidden)`, or `model(src, tgt_in) -> logits`. Encoder
  passes are counted by a `unittest.mock.Mock` forward hook on the `encode` module. PAD and BOS logits are
  pushed down (by -1e4), so that neither ever wins an arg-max;
- end to end: the date-normalisation task generated here; the student's `Seq2SeqTransformer` loads this
  suite's initial weights, is trained by 300 calls of the student's `train_step` (Adam, a linear warm-up
  through `LinearLR`, which gives the same factors min(1, (step + 1) / 50) as the notebook's `LambdaLR`),
  and must translate at least 80 % of 500 held-out dates exactly with the student's `greedy_decode`.
"""
from __future__ import annotations

import datetime
import math
import random
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from coursekit.testing import assert_close, assert_equal, assert_shape, gen, randomize_

transformers = pytest.importorskip("transformers")
from transformers import BartConfig, BartForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()

F64 = torch.float64
TOL32 = dict(atol=1e-5, rtol=1e-4)    # float32 model against the float64 oracle
TOL64 = dict(atol=1e-7, rtol=1e-6)    # float64 model (the provided table is float32-rounded)


# -- helpers ----------------------------------------------------------------------------------------


def contract_name(torch_name: str) -> list[tuple[str, int | None]]:
    """PyTorch's name -> [(contract name, chunk of in_proj or None)]."""
    torch_name = re.sub(r"^transformer\.", "", torch_name)
    match = re.fullmatch(r"(.*)(self_attn|multihead_attn)\.in_proj_(weight|bias)", torch_name)
    if match:
        prefix, attn, kind = match.groups()
        attn = "cross_attn" if attn == "multihead_attn" else attn
        return [(f"{prefix}{attn}.w_{part}.{kind}", i) for i, part in enumerate("qkv")]
    ours = torch_name.replace("multihead_attn.", "cross_attn.").replace(".out_proj.", ".w_o.")
    ours = re.sub(r"(^|\.)(linear[12])\.", r"\1ffn.\2.", ours)
    return [(ours, None)]


def to_contract(torch_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for theirs, tensor in torch_tensors.items():
        for ours, chunk in contract_name(theirs):
            out[ours] = (tensor if chunk is None else tensor.chunk(3)[chunk]).detach().clone()
    return out


def sinusoid(length: int, d_model: int) -> torch.Tensor:
    position = torch.arange(length, dtype=F64)[:, None]
    omega = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=F64) / d_model)
    pe = torch.zeros(length, d_model, dtype=F64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * omega), torch.cos(position * omega)
    return pe


def causal_blocked(length: int) -> torch.Tensor:
    """nn.Transformer's look-ahead mask as booleans (True = blocked)."""
    return nn.Transformer.generate_square_subsequent_mask(length).isinf()


def tgt_mask_oracle(tgt: torch.Tensor, pad_id: int) -> torch.Tensor:
    return ~causal_blocked(tgt.shape[-1]) & (tgt != pad_id)[:, None, None, :]


def src_mask_oracle(src: torch.Tensor, pad_id: int) -> torch.Tensor:
    return (src != pad_id)[:, None, None, :]


def padded_ids(g, batch: int, length: int, vocab: int, pad_id: int, first: int | None = None,
               min_len: int = 1) -> torch.Tensor:
    """(B, L) right-padded ids; real tokens are any id but pad_id; row 0 is full, no row empty.
    first: the id of column 0 (BOS) when given."""
    real = [i for i in range(vocab) if i != pad_id and i != first]
    ids = torch.tensor(real)[torch.randint(len(real), (batch, length), generator=g)]
    if first is not None:
        ids[:, 0] = first
    lengths = torch.randint(min_len, length + 1, (batch,), generator=g)
    lengths[0] = length
    lengths[-1] = min(lengths[-1], max(min_len, length // 2))   # one clearly padded row
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = pad_id
    return ids


def as_tensor(value, what: str) -> torch.Tensor:
    assert isinstance(value, torch.Tensor), (
        f"{what} should return a tensor, got {getattr(value, 'type_name', type(value).__name__)}")
    return value.detach().cpu()


# -- oracles ----------------------------------------------------------------------------------------


def torch_decoder(g, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False):
    layer = nn.TransformerDecoderLayer(d_model, num_heads, d_ff, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=norm_first, dtype=F64)
    norm = nn.LayerNorm(d_model, dtype=F64) if norm_first else None
    return randomize_(nn.TransformerDecoder(layer, num_layers, norm=norm), g).eval()


class OracleSeq2Seq(nn.Module):
    """The contract's model from PyTorch's modules (custom stacks: final norms only for Pre-LN)."""

    def __init__(self, src_vocab, tgt_vocab, d_model, num_heads, n_enc, n_dec, d_ff, pad_id=0,
                 activation="relu", norm_first=False):
        super().__init__()
        kw = dict(dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first, dtype=F64)
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, num_heads, d_ff, **kw), n_enc,
                                        norm=nn.LayerNorm(d_model, dtype=F64) if norm_first else None,
                                        enable_nested_tensor=False)
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, num_heads, d_ff, **kw), n_dec,
                                        norm=nn.LayerNorm(d_model, dtype=F64) if norm_first else None)
        self.transformer = nn.Transformer(d_model, num_heads, custom_encoder=encoder, custom_decoder=decoder,
                                          batch_first=True, dtype=F64)
        self.src_embed = nn.Embedding(src_vocab, d_model, dtype=F64)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, dtype=F64)
        self.generator = nn.Linear(d_model, tgt_vocab, dtype=F64)
        self.d_model, self.pad_id = d_model, pad_id

    def embed(self, embedding, ids):
        return embedding(ids) * math.sqrt(self.d_model) + sinusoid(ids.shape[1], self.d_model)

    def forward(self, src, tgt_in):
        length = tgt_in.shape[1]
        hidden = self.transformer(
            self.embed(self.src_embed, src), self.embed(self.tgt_embed, tgt_in),
            tgt_mask=torch.triu(torch.ones(length, length, dtype=torch.bool), 1), tgt_is_causal=True,
            src_key_padding_mask=src == self.pad_id, memory_key_padding_mask=src == self.pad_id,
            tgt_key_padding_mask=tgt_in == self.pad_id)
        return self.generator(hidden)

    def contract_state(self) -> dict[str, torch.Tensor]:
        return to_contract(self.state_dict())


MODEL_CASES = {  # name: (kwargs for both, Ls, Lt, pad_id, dropout)
    "relu_ls_ne_lt": (dict(activation="relu"), 7, 5, 0, 0.0),
    "gelu_ls_eq_lt": (dict(activation="gelu"), 6, 6, 0, 0.0),
    "pad5_ls_eq_lt": (dict(activation="relu"), 6, 6, 5, 0.0),
    "dropout_eval": (dict(activation="gelu"), 5, 8, 0, 0.1),
}
SRC_V, TGT_V, D, H, N_ENC, N_DEC, D_FF = 13, 11, 16, 4, 3, 1, 32


def model_case(seed: int, case: str, norm_first: bool):
    kwargs, ls, lt, pad_id, dropout = MODEL_CASES[case]
    g = gen(seed)
    oracle = OracleSeq2Seq(SRC_V, TGT_V, D, H, N_ENC, N_DEC, D_FF, pad_id=pad_id, norm_first=norm_first, **kwargs)
    randomize_(oracle, g).eval()
    bos = 1 if pad_id != 1 else 2
    src = padded_ids(g, 4, ls, SRC_V, pad_id)
    tgt_in = padded_ids(g, 4, lt, TGT_V, pad_id, first=bos)
    ctor = dict(d_model=D, num_heads=H, num_encoder_layers=N_ENC, num_decoder_layers=N_DEC, d_ff=D_FF,
                dropout=dropout, pad_id=pad_id, max_len=16, norm_first=norm_first, **kwargs)
    return oracle, src, tgt_in, ctor


def student_model(student, oracle: OracleSeq2Seq, ctor: dict, device, dtype=torch.float32):
    model = student.Seq2SeqTransformer(SRC_V, TGT_V, **ctor)
    names = set(model.state_dict())
    expected = set(oracle.contract_state())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    assert not missing and not unexpected, (
        f"Seq2SeqTransformer's state dict differs from the contract: missing {missing[:5]}, unexpected "
        f"{unexpected[:5]}")
    model.to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in oracle.contract_state().items()})
    model.to(device)
    model.eval()
    return model


def round_to(module: nn.Module, dtype) -> nn.Module:
    """The oracle's weights rounded to dtype (kept in float64), so that both sides use the same numbers."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(F64))
    return module


# -- Task 1: masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_id", [0, 3])
def test_make_src_mask(student, device, pad_id):
    src = padded_ids(gen(10 + pad_id), 4, 7, 9, pad_id)
    actual = as_tensor(student.make_src_mask(src.to(device), pad_id), "make_src_mask")
    assert actual.dtype == torch.bool, f"make_src_mask should return a bool tensor, got {actual.dtype}"
    assert_shape(actual, (4, 1, 1, 7), "make_src_mask(src (4, 7))")
    assert_equal(actual, src_mask_oracle(src, pad_id), "make_src_mask (True on real tokens)")


@pytest.mark.parametrize("pad_id", [0, 3])
def test_make_tgt_mask(student, device, pad_id):
    for seed, (batch, length) in enumerate([(4, 6), (3, 9), (2, 1)]):
        tgt = padded_ids(gen(20 + seed + pad_id), batch, length, 9, pad_id, first=1)
        actual = as_tensor(student.make_tgt_mask(tgt.to(device), pad_id), "make_tgt_mask")
        assert actual.dtype == torch.bool, f"make_tgt_mask should return a bool tensor, got {actual.dtype}"
        assert_shape(actual, (batch, 1, length, length), f"make_tgt_mask(tgt ({batch}, {length}))")
        assert_equal(actual, tgt_mask_oracle(tgt, pad_id),
                     f"make_tgt_mask (look-ahead and key padding, pad_id={pad_id}; padded query rows included)")


# -- Task 2: the decoder stack ------------------------------------------------------------------------------


DECODER_CASES = [  # (seed, num_layers, activation, norm_first, Ls, Lt)
    (0, 3, "relu", False, 7, 5), (1, 2, "gelu", False, 6, 6), (2, 3, "relu", True, 5, 7), (3, 1, "gelu", True, 6, 6),
]


def decoder_case(student, device, seed, num_layers, activation, norm_first, ls, lt, dtype):
    g = gen(100 + seed)
    oracle = torch_decoder(g, num_layers, D, H, D_FF, activation, norm_first)
    if dtype != F64:
        round_to(oracle, dtype)
    handle = student.TransformerDecoder(num_layers, D, H, D_FF, 0.0, activation, norm_first)
    names, expected = set(handle.state_dict()), set(to_contract(oracle.state_dict()))
    assert names == expected, (
        f"TransformerDecoder's parameter names differ from the contract: missing {sorted(expected - names)[:5]}, "
        f"unexpected {sorted(names - expected)[:5]}")
    handle.to(dtype)
    handle.load_state_dict({k: v.to(dtype) for k, v in to_contract(oracle.state_dict()).items()})
    handle.to(device)
    handle.eval()
    x = torch.randn(3, lt, D, generator=g, dtype=F64).to(dtype).to(F64)
    memory = torch.randn(3, ls, D, generator=g, dtype=F64).to(dtype).to(F64)
    tgt = padded_ids(g, 3, lt, 9, 0, first=1)
    src = padded_ids(g, 3, ls, 9, 0)
    expected_out = oracle(x, memory, tgt_mask=causal_blocked(lt), tgt_key_padding_mask=tgt == 0,
                          memory_key_padding_mask=src == 0)
    actual = handle(x.to(dtype).to(device), memory.to(dtype).to(device),
                    tgt_mask=tgt_mask_oracle(tgt, 0).to(device), memory_mask=src_mask_oracle(src, 0).to(device))
    return handle, actual, expected_out


@pytest.mark.parametrize("case", DECODER_CASES, ids=[f"{c[1]}layers-{c[2]}-{'pre' if c[3] else 'post'}ln" for c in DECODER_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_decoder_stack_matches_pytorch(student, device, case, dtype):
    _, actual, expected = decoder_case(student, device, *case, dtype)
    assert_close(as_tensor(actual, "TransformerDecoder"), expected.to(dtype),
                 **(TOL32 if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-8)),
                 what="TransformerDecoder output against nn.TransformerDecoder")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_decoder_stack_final_norm(student, device, norm_first):
    handle, actual, expected = decoder_case(student, device, 5, 2, "relu", norm_first, 6, 4, F64)
    has_norm = handle.norm is not None
    assert has_norm == norm_first, (
        "TransformerDecoder.norm should be an nn.LayerNorm for norm_first=True and None for norm_first=False "
        f"(norm_first={norm_first}, got {'a module' if has_norm else 'None'})")
    assert_close(as_tensor(actual, "TransformerDecoder"), expected, atol=1e-10, rtol=1e-8,
                 what=f"TransformerDecoder output ({'Pre' if norm_first else 'Post'}-LN)")


# -- Task 3: the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_model_state_dict(student, device, norm_first):
    oracle = OracleSeq2Seq(SRC_V, TGT_V, D, H, 2, 2, D_FF, norm_first=norm_first)
    randomize_(oracle, gen(7))
    expected = oracle.contract_state()
    model = student.Seq2SeqTransformer(SRC_V, TGT_V, d_model=D, num_heads=H, num_encoder_layers=2,
                                       num_decoder_layers=2, d_ff=D_FF, dropout=0.1, pad_id=0, max_len=32,
                                       norm_first=norm_first)
    state = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    assert not missing and not unexpected, (
        f"the state dict should hold exactly src_embed, tgt_embed, encoder.*, decoder.*, generator "
        f"(no extra parameters or persistent buffers{'; final norms only for Pre-LN' if not norm_first else ''}): "
        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in expected.items():
        assert tuple(state[name].shape) == tuple(value.shape), (
            f"{name} has shape {tuple(state[name].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: v.float() for k, v in expected.items()})
    back = model.state_dict()
    for name, value in expected.items():   # tied weights would read back the last tensor loaded
        assert_close(back[name].cpu(), value.float(), atol=0, what=f"{name} after load_state_dict (no weight tying)")
    trainable = {name for name, _ in model.named_parameters()}
    assert trainable == set(expected), "every entry of the state dict should be a parameter (no persistent buffers)"


def forward_check(student, device, seed, case, norm_first, dtype):
    oracle, src, tgt_in, ctor = model_case(seed, case, norm_first)
    if dtype != F64:
        round_to(oracle, dtype)
    model = student_model(student, oracle, ctor, device, dtype)
    expected = oracle(src, tgt_in)
    actual = as_tensor(model(src.to(device), tgt_in.to(device)), "Seq2SeqTransformer.forward")
    assert_close(actual, expected.to(dtype), **(TOL32 if dtype == torch.float32 else TOL64),
                 what=f"logits of Seq2SeqTransformer ({'Pre' if norm_first else 'Post'}-LN, {case}, every "
                      f"position, padded ones included) against nn.Transformer")
    return model


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_forward_post_ln_matches_nn_transformer(student, device, case):
    forward_check(student, device, 30 + list(MODEL_CASES).index(case), case, False, torch.float32)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_forward_pre_ln_matches_nn_transformer(student, device, case):
    forward_check(student, device, 40 + list(MODEL_CASES).index(case), case, True, torch.float32)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_forward_float64(student, device, norm_first):
    model = forward_check(student, device, 50 + norm_first, "pad5_ls_eq_lt", norm_first, F64)
    too_long = torch.full((2, 17), 3, dtype=torch.long, device=device)   # max_len is 16
    with pytest.raises(ValueError):
        model(too_long, too_long[:, :4])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encode_decode_use_given_masks(student, device, norm_first):
    """Ls == Lt, two different masks: a swapped order would not crash here, only be wrong."""
    g = gen(60 + norm_first)
    oracle, src, tgt, ctor = model_case(60 + norm_first, "gelu_ls_eq_lt", norm_first)
    model = student_model(student, oracle, ctor, device, F64)
    length = src.shape[1]
    enc, dec = oracle.transformer.encoder, oracle.transformer.decoder
    x_src, x_tgt = oracle.embed(oracle.src_embed, src), oracle.embed(oracle.tgt_embed, tgt)
    # encode: a key mask that is not the padding of src, and no mask at all (src holds pad ids)
    keep = torch.rand(src.shape, generator=g) < 0.7
    keep[:, 0] = True
    memory = as_tensor(model.encode(src.to(device), keep[:, None, None, :].to(device)), "encode")
    assert_close(memory, enc(x_src, src_key_padding_mask=~keep), **TOL64,
                 what="encode(src, src_mask) with a given mask (it should use that mask, not one built from src)")
    assert_close(as_tensor(model.encode(src.to(device), None), "encode"), enc(x_src), **TOL64,
                 what="encode(src, None) (no mask at all, even where src holds pad ids)")
    # decode: a key mask for the cross-attention, an arbitrary (B, 1, Lt, Lt) mask for the self-attention
    mem = torch.randn(src.shape[0], length, D, generator=g, dtype=F64)
    self_mask = torch.rand(src.shape[0], 1, length, length, generator=g) < 0.5
    self_mask[..., 0] = True
    hidden = as_tensor(model.decode(tgt.to(device), mem.to(device), keep[:, None, None, :].to(device),
                                    self_mask.to(device)), "decode")
    expected = dec(x_tgt, mem, tgt_mask=(~self_mask).expand(-1, H, -1, -1).reshape(-1, length, length),
                   memory_key_padding_mask=~keep)
    assert_close(hidden, expected, **TOL64,
                 what="decode(tgt, memory, src_mask, tgt_mask): hidden states (B, Lt, d_model), tgt_mask on the "
                      "decoder's self-attention, src_mask on its cross-attention")
    assert_close(as_tensor(model.decode(tgt.to(device), mem.to(device)), "decode"), dec(x_tgt, mem), **TOL64,
                 what="decode(tgt, memory) without masks")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_model_gradients(student, device, norm_first):
    oracle, src, tgt_in, ctor = model_case(70 + norm_first, "pad5_ls_eq_lt", norm_first)
    model = student_model(student, oracle, ctor, device, F64)
    weights = torch.randn(*tgt_in.shape, TGT_V, generator=gen(71), dtype=F64)
    weights[tgt_in == ctor["pad_id"]] = 0.0     # padded target positions carry no weight, as in a loss
    oracle.zero_grad()
    (oracle(src, tgt_in) * weights).sum().backward()
    expected = to_contract({n: p.grad for n, p in oracle.named_parameters()})
    result = student.backward(model, src.to(device), tgt_in.to(device), grad_outputs=weights.to(device))
    grads = result.param_grads
    for name, grad in expected.items():
        assert grads.get(name) is not None, f"no gradient reached {name}"
        assert_close(grads[name].cpu(), grad, **TOL64, what=f"the gradient of {name}")


# -- Task 4: the loss -----------------------------------------------------------------------------------------


LOSS_CASES = [  # (seed, target shape, V, pad_id, dtype)
    (0, (4, 6), 11, 0, F64), (1, (3, 5), 17, 3, torch.float32), (2, (2, 3, 4), 9, 0, F64), (3, (7,), 5, 4, F64),
]


def loss_inputs(seed, shape, vocab, pad_id, dtype, scale=2.0):
    g = gen(200 + seed)
    logits = (scale * torch.randn(*shape, vocab, generator=g, dtype=F64)).to(dtype)
    tgt = torch.randint(vocab, shape, generator=g)
    flat = tgt.view(-1)
    flat[torch.rand(flat.shape, generator=g) < 0.35] = pad_id    # padding scattered, uneven per row
    flat[0] = (pad_id + 1) % vocab
    return logits, tgt


def loss_oracle(logits, tgt, pad_id, eps):
    return F.cross_entropy(logits.to(F64).reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=pad_id,
                           label_smoothing=eps)


def check_loss(student, device, logits, tgt, pad_id, eps, what, tol=None):
    actual = student.seq2seq_loss(logits.to(device), tgt.to(device), pad_id, eps)
    actual = as_tensor(actual, "seq2seq_loss")
    assert actual.dim() == 0, f"seq2seq_loss should return a 0-dim tensor, got shape {tuple(actual.shape)}"
    assert_close(actual, loss_oracle(logits, tgt, pad_id, eps).to(logits.dtype),
                 **(tol or dict(atol=1e-6, rtol=1e-5)), what=what)


@pytest.mark.parametrize("case", LOSS_CASES, ids=[f"{len(c[1])}d-V{c[2]}-pad{c[3]}-{str(c[4])[6:]}" for c in LOSS_CASES])
def test_loss_matches_cross_entropy(student, device, case):
    seed, shape, vocab, pad_id, dtype = case
    logits, tgt = loss_inputs(seed, shape, vocab, pad_id, dtype)
    check_loss(student, device, logits, tgt, pad_id, 0.0,
               f"seq2seq_loss (no smoothing, pad_id={pad_id}) against F.cross_entropy(ignore_index=pad_id)")


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_loss_label_smoothing(student, device, eps):
    for seed, shape, vocab, pad_id, dtype in LOSS_CASES[:3]:
        logits, tgt = loss_inputs(seed + 10, shape, vocab, pad_id, dtype)
        check_loss(student, device, logits, tgt, pad_id, eps,
                   f"seq2seq_loss with label_smoothing={eps} against F.cross_entropy(label_smoothing={eps})")


def test_loss_large_logits(student, device):
    for dtype, scale in [(F64, 1000.0), (torch.float32, 200.0)]:
        for eps in (0.0, 0.1):
            logits, tgt = loss_inputs(30, (3, 5), 13, 0, dtype, scale=scale)
            check_loss(student, device, logits, tgt, 0, eps,
                       f"seq2seq_loss on logits spread over hundreds ({dtype}, eps={eps}; use log_softmax)")


def test_loss_gradient(student, device):
    for eps in (0.0, 0.1):
        logits, tgt = loss_inputs(40, (3, 6), 11, 2, F64)
        leaf = logits.clone().requires_grad_()
        loss_oracle(leaf, tgt, 2, eps).backward()
        result = student.backward(student.seq2seq_loss, logits.to(device).requires_grad_(), tgt.to(device), 2, eps)
        grad = result.grads[0]
        assert grad is not None, "no gradient reached the logits"
        assert_close(grad.cpu(), leaf.grad, atol=1e-10, rtol=1e-8,
                     what=f"the gradient of seq2seq_loss w.r.t. the logits (eps={eps})")
        assert (grad.cpu()[tgt == 2] == 0).all(), "padded targets should get exactly zero gradient"


def test_loss_rejects_mismatched_shapes(student, device):
    logits, tgt = loss_inputs(50, (2, 5), 11, 0, F64)
    check_loss(student, device, logits, tgt, 0, 0.0, "seq2seq_loss")
    full = torch.cat([torch.ones(2, 1, dtype=torch.long), tgt], dim=1)   # the unshifted (B, L) target
    with pytest.raises(ValueError):   # logits (B, L-1, V) against the unshifted target (B, L)
        student.seq2seq_loss(logits[:, :4].to(device), full[:, :5].to(device), 0, 0.0)


# -- stand-ins built in the student's process from library modules --------------------------------------------


class RemoteGraph:
    """A torch.fx graph built in the student's process, node by node."""

    def __init__(self, student):
        self.student = student
        self.graph = student.lib("torch.fx.Graph")()

    def input(self, name):
        return self.graph.placeholder(name)

    def module(self, target, *args, **kwargs):
        return self.graph.call_module(target, tuple(args), kwargs)

    def method(self, name, *args):
        return self.graph.call_method(name, tuple(args))

    def function(self, path, *args):
        return self.graph.call_function(self.student.lib(path), tuple(args))

    def attr(self, target):
        return self.graph.get_attr(target)

    def build(self, root, output):
        self.graph.output(output)
        return self.student.lib("torch.fx.GraphModule")(root, self.graph)


def hook_counter(student, module):
    counter = student.lib("unittest.mock.Mock")(return_value=None)
    module.register_forward_hook(counter)
    return counter


class TorchStandIn(nn.Module):
    """Embeddings, nn.Transformer (dropout 0), generator: a function of (src, tgt_in) for train_step and a
    protocol model (with nn.Transformer's own masks) for greedy decoding."""

    def __init__(self, g, src_vocab, tgt_vocab, n_enc, n_dec, pad_id, bos_id, push_down=True):
        super().__init__()
        self.src_embed = nn.Embedding(src_vocab, D, dtype=F64)
        self.tgt_embed = nn.Embedding(tgt_vocab, D, dtype=F64)
        self.transformer = nn.Transformer(D, H, n_enc, n_dec, D_FF, dropout=0.0, batch_first=True, dtype=F64)
        self.generator = nn.Linear(D, tgt_vocab, dtype=F64)
        self.transformer.encoder.enable_nested_tensor = False   # padded positions computed, as in the student's
        self.transformer.encoder.use_nested_tensor = False
        randomize_(self, g)
        if push_down:   # greedy decoding: PAD and BOS never win, and no near-ties
            with torch.no_grad():
                self.generator.weight.mul_(3.0)
                self.generator.bias[[pad_id, bos_id]] = -1e4

    def forward(self, src, tgt_in):
        return self.generator(self.transformer(self.src_embed(src), self.tgt_embed(tgt_in)))

    def encode(self, src, src_mask):
        return self.transformer.encoder(self.src_embed(src), src_key_padding_mask=~src_mask.flatten(1))

    def decode(self, tgt, memory, src_mask, tgt_mask):
        blocked = (~tgt_mask).expand(-1, H, -1, -1).flatten(0, 1)
        return self.transformer.decoder(self.tgt_embed(tgt), memory, tgt_mask=blocked,
                                        memory_key_padding_mask=~src_mask.flatten(1))


def remote_stand_in(student, oracle: TorchStandIn, device):
    """The same modules in the student's process: a GraphModule for (src, tgt_in) -> logits."""
    lib = student.lib
    root = lib("torch.nn.ModuleDict")({
        "src_embed": lib("torch.nn.Embedding")(oracle.src_embed.num_embeddings, D),
        "tgt_embed": lib("torch.nn.Embedding")(oracle.tgt_embed.num_embeddings, D),
        "transformer": lib("torch.nn.Transformer")(D, H, len(oracle.transformer.encoder.layers),
                                                    len(oracle.transformer.decoder.layers), D_FF, dropout=0.0,
                                                    batch_first=True),
        "generator": lib("torch.nn.Linear")(D, oracle.generator.out_features),
    })
    encoder = root["transformer"].encoder
    encoder.enable_nested_tensor = False
    encoder.use_nested_tensor = False
    root.double()
    root.load_state_dict(oracle.state_dict())
    root.to(device)
    return root


def remote_forward(student, root):
    g = RemoteGraph(student)
    src, tgt_in = g.input("src"), g.input("tgt_in")
    hidden = g.module("transformer", g.module("src_embed", src), g.module("tgt_embed", tgt_in))
    return g.build(root, g.module("generator", hidden))


def remote_protocol_torch(student, root):
    """encode / decode / generator over the stand-in, honouring the contract's masks (True = may attend)."""
    model = student.lib("torch.nn.Module")()
    g = RemoteGraph(student)
    src, src_mask = g.input("src"), g.input("src_mask")
    kpm = g.function("torch.logical_not", g.method("flatten", src_mask, 1))
    model.encode = g.build(root, g.module("transformer.encoder", g.module("src_embed", src), src_key_padding_mask=kpm))
    g = RemoteGraph(student)
    tgt, memory, src_mask, tgt_mask = g.input("tgt"), g.input("memory"), g.input("src_mask"), g.input("tgt_mask")
    blocked = g.method("flatten", g.method("expand", g.function("torch.logical_not", tgt_mask), -1, H, -1, -1), 0, 1)
    kpm = g.function("torch.logical_not", g.method("flatten", src_mask, 1))
    model.decode = g.build(root, g.module("transformer.decoder", g.module("tgt_embed", tgt), memory,
                                          tgt_mask=blocked, memory_key_padding_mask=kpm))
    g = RemoteGraph(student)
    model.generator = g.build(root, g.module("generator", g.input("hidden")))
    return model


# -- Task 5: train_step ---------------------------------------------------------------------------------------


TRAIN_CASES = {  # name: (optimizer path, optimizer kwargs, train_step kwargs or None for the defaults)
    "sgd_momentum_clip": ("torch.optim.SGD", dict(lr=0.05, momentum=0.9), dict(label_smoothing=0.1, max_grad_norm=0.05)),
    "adam_no_clip": ("torch.optim.Adam", dict(lr=1e-2), dict(label_smoothing=0.0, max_grad_norm=None)),
    "adam_defaults": ("torch.optim.Adam", dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9), None),
}


def reference_step(model, optimizer, src, tgt, pad_id, label_smoothing=0.0, max_grad_norm=1.0):
    model.train()
    logits = model(src, tgt[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=pad_id,
                           label_smoothing=label_smoothing)
    optimizer.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_step_matches_reference_loop(student, device, case):
    opt_path, opt_kwargs, step_kwargs = TRAIN_CASES[case]
    pad_id = 0
    g = gen(300 + list(TRAIN_CASES).index(case))
    oracle = TorchStandIn(g, SRC_V, TGT_V, 2, 1, pad_id, 1, push_down=False)
    root = remote_stand_in(student, oracle, device)
    model = remote_forward(student, root)
    opt_class = {"torch.optim.SGD": torch.optim.SGD, "torch.optim.Adam": torch.optim.Adam}[opt_path]
    optimizer = opt_class(oracle.parameters(), **opt_kwargs)
    remote_opt = student.lib(opt_path)(model.parameters.keep(), **opt_kwargs)   # the parameters themselves
    for step in range(3):
        src = padded_ids(g, 4, 6, SRC_V, pad_id)
        tgt = padded_ids(g, 4, 7, TGT_V, pad_id, first=1, min_len=2)
        kwargs = step_kwargs or {}
        expected = reference_step(oracle, optimizer, src, tgt, pad_id, **kwargs)
        actual = student.train_step(model, remote_opt, src.to(device), tgt.to(device), pad_id, **kwargs)
        assert isinstance(actual, float), f"train_step should return a Python float, got {type(actual).__name__}"
        assert math.isclose(actual, expected, rel_tol=1e-6), (
            f"train_step ({case}) returned loss {actual:.6g} at step {step + 1}, which differs from the reference "
            f"loop's (teacher forcing: model(src, tgt[:, :-1]) scored on tgt[:, 1:], the loss before the update)")
    state = model.state_dict()
    for name, value in oracle.state_dict().items():
        assert_close(state[name].cpu(), value, atol=1e-6, rtol=1e-5,
                     what=f"{name} after 3 train_steps ({case}: zero_grad, backward, clip_grad_norm_, step)")
    assert model.training is True, "train_step should leave the model in training mode (model.train())"


# -- Task 6: greedy decoding ----------------------------------------------------------------------------------

BART_V, BART_PAD, BART_BOS = 20, 0, 1


def bart_config(seed: int, **extra) -> dict:
    config = dict(vocab_size=BART_V, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                  pad_token_id=BART_PAD, bos_token_id=BART_BOS, eos_token_id=2, decoder_start_token_id=BART_BOS,
                  forced_bos_token_id=None, forced_eos_token_id=None, use_cache=False, init_std=0.3,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False)
    config.update(extra)
    return config


_BART_CACHE: dict = {}


def oracle_bart(seed: int) -> BartForConditionalGeneration:
    if seed not in _BART_CACHE:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BartForConditionalGeneration(BartConfig(**bart_config(seed))).to(F64).eval()
        with torch.no_grad():
            model.final_logits_bias[0, [BART_PAD, BART_BOS]] = -1e4
        _BART_CACHE[seed] = model
    return _BART_CACHE[seed]


def bart_generate(model, src, max_len, eos_id):
    with torch.no_grad():
        return model.generate(input_ids=src, attention_mask=(src != BART_PAD).long(), max_length=max_len,
                              do_sample=False, num_beams=1, decoder_start_token_id=BART_BOS, eos_token_id=eos_id,
                              pad_token_id=BART_PAD, min_length=0, no_repeat_ngram_size=0, use_cache=True)


def remote_protocol_bart(student, oracle: BartForConditionalGeneration, device):
    """encode / decode / generator over a BART built in the student's process (its decoder is causal by
    itself, so tgt_mask is not used; src_mask becomes BART's attention mask)."""
    config = student.lib("transformers.BartConfig")(**bart_config(0))
    bart = student.lib("transformers.BartForConditionalGeneration")(config)
    bart.to(F64)
    bart.load_state_dict(oracle.state_dict())
    bart.to(device)
    bart.eval()
    model = student.lib("torch.nn.Module")()
    g = RemoteGraph(student)
    src, src_mask = g.input("src"), g.input("src_mask")
    out = g.module("model.encoder", input_ids=src, attention_mask=g.method("long", g.method("flatten", src_mask, 1)))
    model.encode = g.build(bart, g.function("operator.getitem", out, 0))
    g = RemoteGraph(student)
    tgt, memory, src_mask, _ = g.input("tgt"), g.input("memory"), g.input("src_mask"), g.input("tgt_mask")
    out = g.module("model.decoder", input_ids=tgt, encoder_hidden_states=memory,
                   encoder_attention_mask=g.method("long", g.method("flatten", src_mask, 1)))
    model.decode = g.build(bart, g.function("operator.getitem", out, 0))
    g = RemoteGraph(student)
    model.generator = g.build(bart, g.function("operator.add", g.module("lm_head", g.input("hidden")),
                                               g.attr("final_logits_bias")))
    model.eval()
    return model


def finish_steps(sequences: torch.Tensor, eos_id: int) -> list:
    """Per row: the index of its first EOS (None if never)."""
    steps = []
    for row in sequences.tolist():
        steps.append(row.index(eos_id) if eos_id in row[1:] else None)
    return steps


def pick_eos(model, src, max_len, want_unfinished: bool) -> int:
    """An EOS id under which rows finish at the most different steps (some never, when asked; else all
    before max_len when possible). Rows are independent, so one run without EOS (BOS, which never wins,
    stands for "no EOS") tells where each row would stop for every candidate."""
    free_run = bart_generate(model, src, max_len, BART_BOS)
    best, best_key = None, None
    for eos in range(2, BART_V):
        steps = finish_steps(free_run, eos)
        never = sum(s is None for s in steps)
        distinct = len({s for s in steps if s is not None})
        ok = (never > 0) if want_unfinished else (never == 0)
        key = (ok, distinct, -abs(never - 2))
        if best_key is None or key > best_key:
            best, best_key = eos, key
    return best


GREEDY_CASES = {  # name: (seed, batch, Ls, max_len, rows that never finish?)
    "batch8_max12_some_unfinished": (0, 8, 7, 12, True),
    "batch8_max5": (1, 8, 6, 5, True),
    "batch6_all_finish_early": (2, 6, 5, 12, False),
    "batch_of_one": (3, 1, 6, 12, False),
}


def greedy_bart_case(name):
    seed, batch, ls, max_len, unfinished = GREEDY_CASES[name]
    oracle = oracle_bart(seed % 2)
    src = padded_ids(gen(400 + seed), batch, ls, BART_V, BART_PAD)
    key = ("eos", name)
    if key not in _BART_CACHE:
        eos = pick_eos(oracle, src, max_len, unfinished)
        _BART_CACHE[key] = (eos, bart_generate(oracle, src, max_len, eos))
    eos, expected = _BART_CACHE[key]
    return oracle, src, max_len, eos, expected


def check_ids(actual, expected: torch.Tensor, what: str):
    actual = as_tensor(actual, what)
    assert actual.dtype == torch.long, f"{what} should return a LongTensor, got {actual.dtype}"
    assert actual.dim() == 2 and actual.shape[0] == expected.shape[0], (
        f"{what} should return (B, T) with B = {expected.shape[0]}, got {tuple(actual.shape)}")
    assert actual.shape[1] == expected.shape[1], (
        f"{what}: length T = {actual.shape[1]} where the reference stops at {expected.shape[1]} (stop when every "
        f"row has emitted EOS or T == max_len, BOS counted)")
    assert_equal(actual, expected, what)


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_matches_generate(student, device, case):
    oracle, src, max_len, eos, expected = greedy_bart_case(case)
    model = remote_protocol_bart(student, oracle, device)
    actual = student.greedy_decode(model, src.to(device), max_len, BART_BOS, eos, BART_PAD)
    check_ids(actual, expected, f"greedy_decode against transformers' generate ({case})")


def greedy_definition(oracle: TorchStandIn, src, max_len, bos, eos, pad):
    """The contract's algorithm with nn.Transformer's masks: the arg-max of the full decoder pass on the prefix."""
    with torch.no_grad():
        src_mask = src_mask_oracle(src, pad)
        memory = oracle.encode(src, src_mask)
        ys = torch.full((src.shape[0], 1), bos, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        while ys.shape[1] < max_len and not done.all():
            hidden = oracle.decode(ys, memory, src_mask, tgt_mask_oracle(ys, pad))
            nxt = oracle.generator(hidden[:, -1]).argmax(-1).masked_fill(done, pad)
            ys = torch.cat([ys, nxt[:, None]], 1)
            done |= nxt == eos
    return ys


def test_greedy_torch_stand_in(student, device):
    pad, bos = 0, 1
    g = gen(500)
    oracle = TorchStandIn(g, SRC_V, TGT_V, 1, 2, pad, bos).eval()
    src = padded_ids(g, 6, 7, SRC_V, pad)
    root = remote_stand_in(student, oracle, device)
    root.eval()
    model = remote_protocol_torch(student, root)
    for eos, max_len in [(2, 10), (TGT_V - 1, 10)]:
        # an EOS that several rows emit late, and a token rows may never emit
        candidates = greedy_definition(oracle, src, max_len, bos, -1, pad)
        counts = torch.bincount(candidates[:, 3:].reshape(-1), minlength=TGT_V)
        counts[[pad, bos]] = -1
        eos = int(counts.argmax()) if eos == 2 else int(counts.argmin())
        expected = greedy_definition(oracle, src, max_len, bos, eos, pad)
        actual = student.greedy_decode(model, src.to(device), max_len, bos, eos, pad)
        check_ids(actual, expected, "greedy_decode on an nn.Transformer model (2 decoder layers, which see the "
                                    "target mask) against the arg-max of the full pass on each prefix")


def test_greedy_encodes_once(student, device):
    oracle, src, max_len, eos, expected = greedy_bart_case("batch8_max12_some_unfinished")
    model = remote_protocol_bart(student, oracle, device)
    counter = hook_counter(student, model.encode)
    actual = student.greedy_decode(model, src.to(device), max_len, BART_BOS, eos, BART_PAD)
    check_ids(actual, expected, "greedy_decode")
    calls = counter.call_count
    assert calls == 1, (f"greedy_decode ran the encoder {calls} times for one call on a batch of {src.shape[0]}: "
                        "encode the source once per call, for the whole batch, and reuse the memory")


# -- end to end: dates ---------------------------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SRC_VOCAB = ["<pad>", "<bos>", "<eos>"] + sorted(set("0123456789 " + "".join(MONTHS)))
TGT_VOCAB = ["<pad>", "<bos>", "<eos>"] + list("0123456789-")
FIRST_DAY, LAST_DAY = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()
E2E_STEPS, E2E_BATCH, E2E_TEST, E2E_MIN = 300, 64, 500, 0.80


def random_days(n, rng, exclude=frozenset()):
    days = []
    while len(days) < n:
        day = datetime.date.fromordinal(rng.randint(FIRST_DAY, LAST_DAY))
        if day not in exclude:
            days.append(day)
    return days


def date_batch(days):
    srcs = [f"{d.day} {MONTHS[d.month - 1]} {d.year}" for d in days]
    width = max(map(len, srcs))
    src = torch.zeros(len(days), width, dtype=torch.long)
    tgt = torch.zeros(len(days), 12, dtype=torch.long)
    for b, (s, d) in enumerate(zip(srcs, days)):
        src[b, :len(s)] = torch.tensor([SRC_VOCAB.index(c) for c in s])
        tgt[b] = torch.tensor([1] + [TGT_VOCAB.index(c) for c in d.isoformat()] + [2])
    return src, tgt


def initial_state(names_shapes: dict, d_model: int, seed: int) -> dict:
    """Embeddings N(0, 1/d_model), Xavier-uniform matrices, zero biases, LayerNorms 1/0, by sorted name."""
    g = gen(seed)
    state = {}
    for name in sorted(names_shapes):
        shape = names_shapes[name]
        if "embed" in name:
            state[name] = torch.randn(shape, generator=g) * d_model ** -0.5
        elif "norm" in name:
            state[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif len(shape) == 2:
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))
            state[name] = (torch.rand(shape, generator=g) * 2 - 1) * bound
        else:
            state[name] = torch.zeros(shape)
    return state


def test_end_to_end_dates(student, device):
    reference = OracleSeq2Seq(len(SRC_VOCAB), len(TGT_VOCAB), 64, 4, 2, 2, 128)
    expected_names = {k: tuple(v.shape) for k, v in reference.contract_state().items()}
    model = student.Seq2SeqTransformer(len(SRC_VOCAB), len(TGT_VOCAB), d_model=64, num_heads=4,
                                       num_encoder_layers=2, num_decoder_layers=2, d_ff=128, dropout=0.0,
                                       pad_id=0, max_len=32)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names == expected_names, "Seq2SeqTransformer's state dict differs from the contract (names or shapes)"
    model.load_state_dict(initial_state(expected_names, 64, seed=10))
    model.to(device)
    optimizer = student.lib("torch.optim.Adam")(model.parameters.keep(), lr=2e-3, betas=(0.9, 0.98), eps=1e-9)
    warmup = student.lib("torch.optim.lr_scheduler.LinearLR")(optimizer, start_factor=1 / 50, end_factor=1.0,
                                                              total_iters=49)
    test_days = random_days(E2E_TEST, random.Random(2024))
    rng = random.Random(11)
    threads = student.lib("torch.get_num_threads")()
    student.lib("torch.set_num_threads")(1)
    try:
        losses = []
        for _ in range(E2E_STEPS):
            src, tgt = date_batch(random_days(E2E_BATCH, rng, exclude=set(test_days)))
            losses.append(student.train_step(model, optimizer, src.to(device), tgt.to(device), 0, 0.0, 1.0))
            warmup.step()
        model.eval()
        src, _ = date_batch(test_days)
        out = as_tensor(student.greedy_decode(model, src.to(device), 12, 1, 2, 0), "greedy_decode")
    finally:
        student.lib("torch.set_num_threads")(threads)
    hits = 0
    for row, day in zip(out.tolist(), test_days):
        row = row[1:row.index(2)] if 2 in row else row[1:]
        hits += "".join(TGT_VOCAB[i] if 2 < i < len(TGT_VOCAB) else "?" for i in row) == day.isoformat()
    accuracy = hits / E2E_TEST
    assert accuracy >= E2E_MIN, (
        f"after {E2E_STEPS} train_steps (final training loss {losses[-1]:.3f}) greedy_decode translates "
        f"{accuracy:.1%} of {E2E_TEST} held-out dates exactly; at least {E2E_MIN:.0%} is expected")
