"""Hidden suite for lab 07: a character-level GPT from scratch, with a KV cache.

Oracles, computed here in the grader's process:
- the model (attention, block, logits, loss, cache, causality, converter, dropout): seeded
  `transformers.GPT2LMHeadModel`s in float64 with `initializer_range=0.2` (at GPT-2's own 0.02 the
  exact-GELU near miss moves the logits by only ~1e-6), dropout 0, eager attention, in three shapes
  (V/P/C/L/H = 50/24/32/2/4, 37/16/24/3/3, 65/32/48/1/2). The suite transposes the four Conv1D
  weights itself and loads them into the student's modules with `strict=False`, requiring every
  parameter to be filled, so that a converter bug costs only the converter test.
  `GPT2Attention` and `GPT2Block` are called with an additive causal mask. The cache is compared
  with GPT-2's own (`DynamicCache.layers[i].keys/values`), and GPT-2's cache is fed back as
  `past_kv`. Tolerances: float64 students 1e-9 (causality 1e-10); float32 students against the
  float64 oracle atol 5e-5 + rtol 1e-5 (causality 1e-5).
- the loss: `F.cross_entropy` on GPT-2's float64 logits against the pre-shifted targets (-100
  ignored), which equals `GPT2LMHeadModel(s, labels=s).loss` for `s = cat(x, y[:, -1:])`.
- the initialisation: GPT-2's scheme (N(0, 0.02), residual projections N(0, 0.02/sqrt(2 L)),
  biases 0, LayerNorm (1, 0)); each weight's standard deviation within 10%.
- the converter: tensor-for-tensor equality with the suite's own conversion, then logits after a
  strict load; the input dict is kept in the student's process to check it is not modified.
- the optimiser: the parameter groups (by shape) and one AdamW step with all-zero gradients, after
  which exactly the >= 2-D parameters shrink by (1 - lr * weight_decay).
- `get_lr`: `transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate` times max_lr for
  every step below max_iters (1e-12 * max_lr); min_lr from max_iters on.
- `clip_grad_norm`: `torch.nn.utils.clip_grad_norm_` (rtol 1e-5) on parameters that live in the
  student's process, passed as a list and as a one-shot iterator.
- `train`: the suite's own loop (torch AdamW with the decay groups, `clip_grad_norm_`, the
  transformers schedule) on a float64 GPT-2 with the same weights, on constant data (every window
  identical, so the batch sampler does not matter). End to end: the contract's model (65 ids,
  block 32, 2 layers, 4 heads, 64 dims) starting from transformers' GPT-2 initialisation (seed
  1234), trained 1,000 steps on the first 90% of Tiny Shakespeare; the cross-entropy of the
  character after 512 evenly spaced windows of the last 10%, read at each window's last position
  with the student's model in eval mode, must be <= 2.20.
- `generate`: greedy (top_k=1) against `GPT2LMHeadModel.generate(do_sample=False)` on float64
  models at initializer_range 1.0 (top-2 gaps large enough that float noise never decides);
  past block_size against the suite's own crop-and-recompute arg-max loop over the student's
  model; 8,000 single-token draws per setting against softmax(logits / T) restricted to the top k
  (GPT-2's float64 logits), within 0.025.
- "the cache is used": `torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of generating
  100 tokens from a 1-token prompt (block 128), with and without the cache; cached must be at
  most a quarter of uncached (the reference: ~0.015). The model runs in the student's process,
  so the counter must too: the suite builds `FlopCounterMode(display=False)` and a
  `contextlib.ExitStack` there (library objects, through `student.lib`), enters the counter with
  `stack.enter_context(mode)`, calls `generate`, and closes the stack in a `finally`. The proxy
  cannot run a `with` statement on a handle; `ExitStack` turns entering and leaving into plain
  method calls. Nothing is timed: on a model this size Python overhead dominates wall clock.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coursekit.testing import assert_close, assert_equal, assert_shape

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate  # noqa: E402

transformers.logging.set_verbosity_error()


CONFIGS = [  # (V, P, C, L, H)
    (50, 24, 32, 2, 4),
    (37, 16, 24, 3, 3),
    (65, 32, 48, 1, 2),
]
CONFIG_IDS = ["V50-P24-C32-L2-H4", "V37-P16-C24-L3-H3", "V65-P32-C48-L1-H2"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
F64_ATOL = 1e-9
F32_ATOL, F32_RTOL = 5e-5, 1e-5


# -- oracles ------------------------------------------------------------------------------------------


def gpt2_oracle(V, P, C, L, H, seed=0, init=0.2) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H, initializer_range=init,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.double().eval()


def convert(state_dict: dict, prefix: str = "") -> dict:
    """GPT-2's state dict (keys under `prefix`) in nn.Linear's layout, prefix removed."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = key[len(prefix):]
        out[name] = value.t().contiguous() if key.endswith(CONV1D) else value.clone()
    return out


def additive_causal_mask(T: int, dtype=torch.float64) -> torch.Tensor:
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.zeros(1, 1, T, T, dtype=dtype).masked_fill(~allowed, float("-inf"))


def ids_for(V, B, T, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def as_pairs(present, what: str) -> list:
    assert isinstance(present, (list, tuple)), f"{what} should be a list of (k, v) pairs, got {type(present).__name__}"
    for i, pair in enumerate(present):
        assert isinstance(pair, (list, tuple)) and len(pair) == 2, f"{what}[{i}] should be a (k, v) pair"
    return list(present)


# -- the student's objects ------------------------------------------------------------------------------


def student_config(student, V, P, C, L, H, dropout=0.0):
    return student.GPTConfig(vocab_size=V, block_size=P, n_layer=L, n_head=H, n_embd=C, dropout=dropout)


def load_filled(module, state: dict, what: str) -> None:
    """load_state_dict(strict=False), then require every parameter of the module to be filled."""
    result = module.load_state_dict(state, strict=False)
    missing = list(result[0])
    names = {name for name, _ in module.named_parameters()}
    unfilled = sorted(set(names) - set(state))
    assert not unfilled, (f"{what}: these parameters do not have GPT-2's names, so GPT-2's weights could not "
                          f"be loaded into them: {unfilled[:6]}")
    del missing


def student_gpt(student, device, oracle: GPT2LMHeadModel | None, V, P, C, L, H, dtype=torch.float64,
                dropout=0.0):
    model = student.GPT.keep(student_config(student, V, P, C, L, H, dropout))
    model.to(dtype)
    if oracle is not None:
        load_filled(model, convert(oracle.state_dict()), "GPT")
    model.to(device)
    model.eval()
    return model


def logits_of(result, what="GPT's forward"):
    assert isinstance(result, (tuple, list)) and len(result) == 3, (
        f"{what} should return (logits, loss, present_kv)")
    return result[0]


def tensor_close(actual, expected, dtype, what, f64_atol=F64_ATOL, f32_atol=F32_ATOL):
    if dtype == torch.float64:
        assert_close(actual, expected, atol=f64_atol, what=what)
    else:
        assert_close(actual, expected.float(), atol=f32_atol, rtol=F32_RTOL, what=what)


DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]


# -- tokenizer and data ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare(data_dir) -> str:
    return (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")


def test_tokenizer_vocab_roundtrip(student, shakespeare):
    text = shakespeare
    tok = student.CharTokenizer(text)
    chars = "".join(sorted(set(text)))
    assert tok.vocab_size == 65, f"Tiny Shakespeare has 65 distinct characters, your vocab_size is {tok.vocab_size}"
    assert isinstance(tok.chars, str), "chars should be a str (the characters in id order)"
    assert tok.chars == chars, "chars should be sorted(set(text)) joined into a str (code-point order)"
    sample = text[1000:1400]
    ids = tok.encode(sample)
    assert isinstance(ids, list) and all(type(i) is int for i in ids), "encode should return a list of ints"
    assert ids == [chars.index(c) for c in sample], "encode gives the wrong ids (id = position in sorted(set(text)))"
    assert tok.encode("\n a") == [0, 1, 39], "with Tiny Shakespeare, '\\n' is 0, ' ' is 1 and 'a' is 39"
    assert tok.decode(ids) == sample, "decode(encode(s)) should give s back (list of ints)"
    assert tok.decode(torch.tensor(ids)) == sample, "decode should accept a 1-D LongTensor too"
    assert tok.encode("") == [] and tok.decode([]) == "", "the empty string and the empty list round-trip"
    small = student.CharTokenizer("hello world")
    assert small.chars == " dehlorw" and small.vocab_size == 8, "the vocabulary is sorted(set(text)) of the given text"


def test_tokenizer_errors(student):
    tok = student.CharTokenizer("abcde")
    assert tok.decode([4, 0]) == "ea", "decode([4, 0]) on the vocabulary 'abcde' should be 'ea'"
    with pytest.raises(ValueError):
        student.CharTokenizer("")
    with pytest.raises(ValueError):
        tok.encode("abz")       # a bare stoi lookup raises KeyError, not ValueError
    with pytest.raises(ValueError):
        tok.decode([0, -1])     # a list lookup would silently give the last character
    with pytest.raises(ValueError):
        tok.decode([5])
    with pytest.raises(ValueError):
        tok.decode(torch.tensor([1, 7]))


def test_get_batch(student, device):
    data = torch.arange(13, device=device)
    gen = student.lib("torch.Generator").keep(device).manual_seed(0)
    x, y = student.get_batch(data, 10, 600, gen)
    assert_shape(x, (600, 10), "x")
    assert_shape(y, (600, 10), "y")
    assert x.dtype == torch.int64 and y.dtype == torch.int64, "x and y should be int64"
    assert x.device.type == torch.device(device).type, "x and y should be on data's device"
    x, y = x.cpu(), y.cpu()
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(10)), "each row of x should be data[s : s + block_size]"
    assert torch.equal(y, x + 1), "y should be x shifted by one: data[s + 1 : s + block_size + 1]"
    counts = torch.bincount(starts, minlength=3)
    assert starts.min() >= 0 and starts.max() <= 2, "a start s must lie in 0 .. len(data) - block_size - 1"
    assert (counts > 120).all(), (f"the 3 possible windows came up {counts.tolist()} times in 600 rows: every "
                                  "start 0 .. len(data) - block_size - 1 should be equally likely (is the last "
                                  "one missing? randint's upper bound is exclusive)")
    # the same generator seed gives the same batch
    a = student.get_batch(torch.arange(100, device=device), 8, 5, student.lib("torch.Generator").keep(device).manual_seed(3))
    b = student.get_batch(torch.arange(100, device=device), 8, 5, student.lib("torch.Generator").keep(device).manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "the same generator seed should give the same batch"
    with pytest.raises(ValueError):
        student.get_batch(torch.arange(10), 10, 2)


# -- structure ---------------------------------------------------------------------------------------------


def test_parameter_names_and_shapes(student):
    for V, P, C, L, H in CONFIGS:
        oracle = gpt2_oracle(V, P, C, L, H)
        expected = convert(oracle.state_dict())
        model = student.GPT.keep(student_config(student, V, P, C, L, H))
        state = model.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        assert not missing and not extra, (f"GPT's state_dict keys should be exactly GPT2LMHeadModel's; missing "
                                           f"{missing[:5]}, unexpected {extra[:5]} (a mask buffer must be "
                                           "registered with persistent=False)")
        for name, value in expected.items():
            assert tuple(state[name].shape) == tuple(value.shape), (
                f"{name} has shape {tuple(state[name].shape)}, expected {tuple(value.shape)} (nn.Linear's "
                "(out_features, in_features) layout)")
        assert model.config.block_size == P and model.config.n_embd == C, "GPT should keep its config as .config"
    with pytest.raises(ValueError):
        student.CausalSelfAttention(student_config(student, 50, 24, 30, 2, 4))


def test_weight_tying(student):
    V, P, C, L, H = CONFIGS[0]
    model = student.GPT.keep(student_config(student, V, P, C, L, H))
    get = student.lib("builtins.getattr")
    head = get.keep(model.lm_head, "weight")
    wte = get.keep(model.transformer.wte, "weight")
    assert student.lib("operator.is_")(head, wte), (
        "lm_head.weight should be the very same Parameter object as transformer.wte.weight "
        "(tie by assignment: self.lm_head.weight = self.transformer.wte.weight)")
    n_params = student.lib("builtins.len")(student.lib("builtins.list").keep(model.parameters.keep()))
    expected = len(list(gpt2_oracle(V, P, C, L, H).parameters()))
    assert n_params == expected, (f"model.parameters() yields {n_params} tensors, GPT-2 has {expected}: the tied "
                                  "matrix should be one Parameter")


def test_init_gpt2(student):
    V, P, C, L, H = 65, 64, 128, 3, 4
    student.lib("torch.manual_seed")(0)
    state = student.GPT.keep(student_config(student, V, P, C, L, H)).state_dict()
    for name, value in state.items():
        value = value.double()
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.equal(value, torch.ones_like(value)), f"{name} should start at 1"
        elif name.endswith(".bias"):
            assert torch.equal(value, torch.zeros_like(value)), f"{name} should start at 0"
        else:
            target = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02
            std, mean = float(value.std()), float(value.mean())
            assert abs(std / target - 1) <= 0.10, (f"{name} has standard deviation {std:.4g}; GPT-2's initialisation "
                                                   "gives N(0, 0.02), and N(0, 0.02/sqrt(2 n_layer)) for c_proj")
            assert abs(mean) <= 0.1 * target, f"{name} should have mean 0"


# -- numerics against GPT-2 --------------------------------------------------------------------------------


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_matches_gpt2(student, device, dtype):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=10 + index)
        attn = oracle.transformer.h[0].attn
        mine = student.CausalSelfAttention.keep(student_config(student, V, P, C, L, H))
        mine.to(dtype)
        load_filled(mine, _sub(convert(oracle.state_dict()), "transformer.h.0.attn."), "CausalSelfAttention")
        mine.to(device)
        mine.eval()
        g = torch.Generator().manual_seed(index)
        x = torch.randn(2, P, C, generator=g, dtype=torch.float64)
        with torch.no_grad():
            expected = attn(x, attention_mask=additive_causal_mask(P))[0]
            q, k, v = attn.c_attn(x).split(C, dim=2)
            k = k.view(2, P, H, C // H).transpose(1, 2)
            v = v.view(2, P, H, C // H).transpose(1, 2)
        result = mine(x.to(device, dtype))
        assert isinstance(result, (tuple, list)) and len(result) == 2, "CausalSelfAttention should return (y, (k, v))"
        tensor_close(result[0], expected, dtype, "CausalSelfAttention's output")
        tensor_close(result[1][0], k, dtype, "the returned k (B, n_head, T, head_dim)")
        tensor_close(result[1][1], v, dtype, "the returned v (B, n_head, T, head_dim)")
        # the last few queries, fed with the first keys as a cache
        split = P - 3
        result = mine(x[:, split:].to(device, dtype), past_kv=(k[:, :, :split].to(device, dtype),
                                                              v[:, :, :split].to(device, dtype)))
        tensor_close(result[0], expected[:, split:], dtype, "CausalSelfAttention's output for 3 new tokens with a cache")


def test_block_matches_gpt2(student, device):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=20 + index)
        block = oracle.transformer.h[L - 1]
        mine = student.Block.keep(student_config(student, V, P, C, L, H))
        mine.to(torch.float64)
        load_filled(mine, _sub(convert(oracle.state_dict()), f"transformer.h.{L - 1}."), "Block")
        mine.to(device)
        mine.eval()
        x = torch.randn(3, P, C, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        with torch.no_grad():
            expected = block(x, attention_mask=additive_causal_mask(P))
        expected = expected[0] if isinstance(expected, tuple) else expected
        result = mine(x.to(device))
        assert isinstance(result, (tuple, list)) and len(result) == 2, "Block should return (x, (k, v))"
        assert_close(result[0], expected, atol=F64_ATOL, what="Block's output")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logits_match_gpt2(student, device, dtype):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=30 + index)
        model = student_gpt(student, device, oracle, V, P, C, L, H, dtype)
        for T in (P, 5, 1):
            ids = ids_for(V, 2, T, seed=index * 7 + T)
            with torch.no_grad():
                expected = oracle(ids).logits
            result = model(ids.to(device))
            tensor_close(logits_of(result), expected, dtype, f"GPT's logits for T={T}")
            assert result[1] is None, "loss should be None when no targets are given"


def test_loss_pre_shifted_targets(student, device):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=40 + index)
        model = student_gpt(student, device, oracle, V, P, C, L, H)
        s = ids_for(V, 3, P + 1, seed=400 + index)
        x, y = s[:, :-1], s[:, 1:]
        with torch.no_grad():
            logits = oracle(x).logits
            expected = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        result = model(x.to(device), y.to(device))
        assert result[1] is not None, "with targets, GPT should return a loss"
        assert_close(result[1], expected, atol=F64_ATOL,
                     what="the loss for targets y = x shifted by one (the model must not shift again)")
        # the two conventions meet: loss(x, y) = GPT2LMHeadModel(s, labels=s).loss for s = cat(x, y[:, -1:])
        # (transformers' loss is upcast to float32: its float64 value is the cross-entropy of its shifted logits)
        short = s[:, :P]
        with torch.no_grad():
            hf_logits = oracle(short).logits
            expected = F.cross_entropy(hf_logits[:, :-1].reshape(-1, V), short[:, 1:].reshape(-1))
            assert abs(float(expected) - float(oracle(short, labels=short).loss)) < 1e-5
        assert_close(model(short[:, :-1].to(device), short[:, 1:].to(device))[1], expected, atol=F64_ATOL,
                     what="the loss of (x, y) against transformers' GPT2LMHeadModel(s, labels=s).loss for "
                          "s = cat(x, y[:, -1:])")
        # ignored positions
        y_ignored = y.clone()
        y_ignored[0, :4] = -100
        y_ignored[2, -1] = -100
        keep = y_ignored.reshape(-1) != -100
        with torch.no_grad():
            expected = F.cross_entropy(logits.reshape(-1, V)[keep], y_ignored.reshape(-1)[keep])
        assert_close(model(x.to(device), y_ignored.to(device))[1], expected, atol=F64_ATOL,
                     what="the loss when some targets are -100 (ignored)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_causality(student, device, dtype):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=50 + index)
        model = student_gpt(student, device, oracle, V, P, C, L, H, dtype)
        ids = ids_for(V, 2, P, seed=500 + index)
        base = logits_of(model(ids.to(device))).cpu()
        with torch.no_grad():
            tensor_close(base, oracle(ids).logits, dtype, "GPT's logits")
        for p in (0, 3, P // 2, P - 2):
            changed = ids.clone()
            changed[:, p + 1:] = (ids[:, p + 1:] + 1 + torch.arange(P - p - 1)) % V
            other = logits_of(model(changed.to(device))).cpu()
            atol = 1e-10 if dtype == torch.float64 else 1e-5
            assert_close(other[:, :p + 1], base[:, :p + 1], atol=atol,
                         what=f"the logits at positions <= {p} after changing only the tokens after {p} (they "
                              "should not change: a position may not see the future)")


# -- cache, converter, dropout ------------------------------------------------------------------------------


def test_kv_cache_matches_recompute(student, device):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=60 + index)
        model = student_gpt(student, device, oracle, V, P, C, L, H)
        ids = ids_for(V, 2, P, seed=600 + index)
        with torch.no_grad():
            out = oracle(ids, use_cache=True)
        full = out.logits
        # present_kv: GPT-2's cache, (B, n_head, T, head_dim)
        logits, _, present = model(ids.to(device))
        present = as_pairs(present, "present_kv")
        assert len(present) == L, f"present_kv should hold one (k, v) pair per layer ({L}), got {len(present)}"
        for i, (k, v) in enumerate(present):
            assert_close(k, out.past_key_values.layers[i].keys, atol=F64_ATOL,
                         what=f"present_kv[{i}][0] (layer {i}'s keys, (B, n_head, T, head_dim))")
            assert_close(v, out.past_key_values.layers[i].values, atol=F64_ATOL,
                         what=f"present_kv[{i}][1] (layer {i}'s values)")
        # a 5-token prefix, then one token per step
        logits, _, past = model(ids[:, :5].to(device))
        assert_close(logits, full[:, :5], atol=F64_ATOL, what="the logits of a 5-token prefix")
        for t in range(5, P):
            logits, _, past = model(ids[:, t:t + 1].to(device), past_kv=past)
            assert_close(logits, full[:, t:t + 1], atol=F64_ATOL,
                         what=f"the logits of position {t}, fed alone with the cache of positions 0..{t - 1}")
        # chunks of several tokens with a cache
        past, t, sizes = None, 0, [3, 1, 4, 2, 5, 1, 3, 2, 4, 3, 1, 5]
        for size in sizes:
            size = min(size, P - t)
            if size == 0:
                break
            logits, _, past = model(ids[:, t:t + size].to(device), past_kv=past)
            assert_close(logits, full[:, t:t + size], atol=F64_ATOL,
                         what=f"the logits of positions {t}..{t + size - 1}, fed as one chunk with a cache of {t} "
                              "positions (a chunk of several new tokens must be masked)")
            t += size
        # GPT-2's cache fed as past_kv continues to GPT-2's logits
        split = P // 2 + 1
        with torch.no_grad():
            cache = oracle(ids[:, :split], use_cache=True).past_key_values
        past = [(layer.keys, layer.values) for layer in cache.layers]
        logits = logits_of(model(ids[:, split:].to(device), past_kv=[(k.to(device), v.to(device)) for k, v in past]))
        assert_close(logits, full[:, split:], atol=F64_ATOL,
                     what="the logits after feeding transformers' GPT-2 cache as past_kv")
    # past_kv is not modified: keep it in the student's process, compare before and after
    out_handle = model.keep(ids[:, :4].to(device))
    past_handle = student.lib("operator.getitem").keep(out_handle, 2)
    before = student.lib("builtins.list")(past_handle)
    model(ids[:, 4:6].to(device), past_kv=past_handle)
    after = student.lib("builtins.list")(past_handle)
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), "GPT's forward should not modify the past_kv it is given"
    # float32: a cached last step matches the float64 oracle
    V, P, C, L, H = CONFIGS[0]
    oracle = gpt2_oracle(V, P, C, L, H, seed=69)
    model = student_gpt(student, device, oracle, V, P, C, L, H, torch.float32)
    ids = ids_for(V, 2, P, seed=699)
    with torch.no_grad():
        full = oracle(ids).logits
    _, _, past = model(ids[:, :-1].to(device))
    logits = logits_of(model(ids[:, -1:].to(device), past_kv=past))
    assert_close(logits, full[:, -1:].float(), atol=F32_ATOL, rtol=F32_RTOL,
                 what="float32 logits of the last position, fed with a cache")


def test_block_size_limit(student, device):
    V, P, C, L, H = CONFIGS[1]
    model = student_gpt(student, device, gpt2_oracle(V, P, C, L, H), V, P, C, L, H)
    logits, _, past = model(ids_for(V, 1, P, 7).to(device))
    assert_shape(logits, (1, P, V), "the logits for T = block_size")
    with pytest.raises(ValueError):
        model(ids_for(V, 1, P + 1, 7).to(device))
    _, _, past = model(ids_for(V, 1, P - 1, 7).to(device))
    with pytest.raises(ValueError):
        model(ids_for(V, 1, 2, 8).to(device), past_kv=past)


def old_checkpoint(state_dict: dict, P: int, L: int, prefix: str) -> dict:
    """What older transformers versions saved: the causal-mask buffers of every layer."""
    state = dict(state_dict)
    for i in range(L):
        state[f"{prefix}h.{i}.attn.bias"] = torch.ones(P, P, dtype=torch.bool).tril().view(1, 1, P, P)
        state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def test_convert_gpt2_state_dict(student, device):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=70 + index)
        lm_state = oracle.state_dict()
        expected = convert(lm_state)
        base_state = oracle.transformer.state_dict()
        cases = [("a GPT2LMHeadModel state dict", lm_state),
                 ("a GPT2Model state dict (no 'transformer.' prefix, no lm_head.weight)", base_state),
                 ("an old checkpoint with attn.bias / attn.masked_bias buffers", old_checkpoint(lm_state, P, L, "transformer.")),
                 ("an old GPT2Model checkpoint", old_checkpoint(base_state, P, L, ""))]
        for what, state in cases:
            kept = student.lib("builtins.dict").keep(state)     # the input stays in the student's process
            result = student.convert_gpt2_state_dict(kept)
            assert isinstance(result, dict), "convert_gpt2_state_dict should return a dict"
            missing, extra = sorted(set(expected) - set(result)), sorted(set(result) - set(expected))
            assert not missing and not extra, f"converting {what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
            for key, value in expected.items():
                assert_equal(result[key], value, what=f"converting {what}: {key}")
            after = student.lib("builtins.dict")(kept)
            assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state), (
                "convert_gpt2_state_dict should not modify the dict it is given")
        # logits after a strict load
        model = student.GPT.keep(student_config(student, V, P, C, L, H))
        model.to(torch.float64)
        model.load_state_dict(student.convert_gpt2_state_dict.keep(base_state), strict=True)
        model.to(device)
        model.eval()
        ids = ids_for(V, 2, P, seed=700 + index)
        with torch.no_grad():
            full = oracle(ids).logits
        assert_close(logits_of(model(ids.to(device))), full, atol=F64_ATOL,
                     what="the logits of GPT loaded with the converted GPT-2 weights")


def test_dropout_train_eval(student, device):
    V, P, C, L, H = CONFIGS[0]
    oracle = gpt2_oracle(V, P, C, L, H, seed=80)
    model = student_gpt(student, device, oracle, V, P, C, L, H, dropout=0.5)
    ids = ids_for(V, 2, P, seed=800).to(device)
    with torch.no_grad():
        expected = oracle(ids.cpu()).logits
    assert_close(logits_of(model(ids)), expected, atol=F64_ATOL, what="the logits in eval mode (dropout off)")
    model.train()
    a, b = logits_of(model(ids)).cpu(), logits_of(model(ids)).cpu()
    assert not torch.allclose(a, expected, atol=1e-3), "in train mode with dropout=0.5 the logits should change"
    assert not torch.allclose(a, b, atol=1e-3), "in train mode two calls should draw different dropout masks"
    attn = student.CausalSelfAttention.keep(student_config(student, V, P, C, L, H, dropout=0.5))
    attn.to(torch.float64)
    attn.to(device)
    attn.train()
    x = torch.randn(2, P, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device)
    y1, y2 = attn(x)[0].cpu(), attn(x)[0].cpu()
    assert not torch.allclose(y1, y2, atol=1e-6), "CausalSelfAttention should apply dropout in train mode"
    attn.eval()
    assert torch.equal(attn(x)[0].cpu(), attn(x)[0].cpu()), "CausalSelfAttention should be deterministic in eval mode"


# -- training pieces ---------------------------------------------------------------------------------------


def zero_grad_step_check(student, device, model, opt, lr, wd):
    before = model.state_dict()
    V = model.config.vocab_size
    ids = ids_for(V, 1, 4, 9).to(device)
    logits = logits_of(model(ids))
    student.backward(model, ids, grad_outputs=(torch.zeros_like(logits), None, None))
    opt.step()
    after = model.state_dict()
    for name, value in before.items():
        if value.dim() >= 2:
            assert_close(after[name], value * (1 - lr * wd), atol=0, rtol=1e-6,
                         what=f"{name} after one AdamW step with zero gradients (it should shrink by "
                              "1 - lr * weight_decay: >= 2-D parameters are decayed, exactly once)")
        else:
            assert_equal(after[name], value, what=f"{name} after one AdamW step with zero gradients (parameters with "
                                                  "dim() < 2 get weight_decay 0)")


def test_configure_optimizer(student, device):
    V, P, C, L, H = CONFIGS[0]
    model = student_gpt(student, device, gpt2_oracle(V, P, C, L, H, seed=90), V, P, C, L, H, torch.float32)
    lr, wd, betas = 0.05, 0.3, (0.8, 0.95)
    opt = student.configure_optimizer.keep(model, lr, wd, betas=betas)
    assert opt.isinstance("torch.optim.AdamW"), "configure_optimizer should return a torch.optim.AdamW"
    groups = opt.param_groups
    n_unique = student.lib("builtins.len")(student.lib("builtins.list").keep(model.parameters.keep()))
    shapes = [(g["weight_decay"], [p.dim() for p in g["params"]]) for g in groups]
    total = sum(len(dims) for _, dims in shapes)
    assert total == n_unique, (f"the groups hold {total} parameters, the model has {n_unique}: every parameter "
                               "should be in exactly one group (the tied matrix once)")
    for decay, dims in shapes:
        if any(d >= 2 for d in dims):
            assert all(d >= 2 for d in dims) and decay == pytest.approx(wd), (
                "parameters with dim() >= 2 should be in a group with weight_decay, without the 1-D ones")
        elif dims:
            assert decay == 0.0, "biases and LayerNorm parameters (dim() < 2) should have weight_decay 0.0"
    for g in groups:
        assert g["lr"] == pytest.approx(lr) and tuple(g["betas"]) == pytest.approx(betas), (
            "lr and betas should be set on every group")
    zero_grad_step_check(student, device, model, opt, lr, wd)
    default = student.configure_optimizer.keep(model, 1e-3, 0.1)
    assert all(tuple(g["betas"]) == pytest.approx((0.9, 0.99)) for g in default.param_groups), (
        "the default betas are (0.9, 0.99)")


LR_CASES = [  # max_lr, min_lr, warmup_iters, max_iters
    (6e-4, 6e-5, 10, 100),
    (1e-2, 1e-3, 50, 300),
    (1.0, 0.1, 0, 20),
    (3e-3, 0.0, 5, 6),
    (2e-3, 2e-4, 1, 12),
]


def test_get_lr(student):
    for max_lr, min_lr, warmup, max_iters in LR_CASES:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=max_lr)
        sched = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(opt, warmup, max_iters, min_lr_rate=min_lr / max_lr)
        its = list(range(max_iters + 5))
        n = len(its)
        got = student.lib("builtins.list")(student.lib("builtins.map").keep(
            student.get_lr, its, [max_lr] * n, [min_lr] * n, [warmup] * n, [max_iters] * n))
        assert all(isinstance(v, float) for v in got), "get_lr should return a Python float"
        for it in its:
            expected = sched.lr_lambdas[0](it) * max_lr if it < max_iters else min_lr
            assert abs(got[it] - expected) <= 1e-12 * max_lr, (
                f"get_lr(it={it}, max_lr={max_lr}, min_lr={min_lr}, warmup_iters={warmup}, max_iters={max_iters}) "
                f"is off by {abs(got[it] - expected):.3g} (warm-up: max_lr*(it+1)/warmup_iters; cosine up to "
                "it = max_iters - 1, where it reaches min_lr; min_lr from then on)")


CLIP_CASES = [  # (dtype, max_norm, grad scales), a parameter without gradient in every case
    (torch.float32, 1.0, (1e3, 1.0, 1e-3)),
    (torch.float64, 0.5, (3.0, 1e-2, 40.0)),
    (torch.float32, 100.0, (0.5, 2.0, 1e-4)),      # below max_norm: untouched
]


def test_clip_grad_norm(student, device):
    Parameter = student.lib("torch.nn.Parameter")
    for case, (dtype, max_norm, scales) in enumerate(CLIP_CASES):
        g = torch.Generator().manual_seed(case)
        shapes = [(7, 5), (11,), (3, 4, 2)]
        values = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        grads = [scale * torch.randn(s, generator=g, dtype=dtype) for s, scale in zip(shapes, scales)]
        local = [torch.nn.Parameter(v.clone()) for v in values] + [torch.nn.Parameter(torch.randn(4, dtype=dtype))]
        for p, gr in zip(local, grads):
            p.grad = gr.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(local, max_norm)
        for as_iterator in (False, True):
            remote = [Parameter.keep(v.to(device)) for v in values] + [Parameter.keep(torch.randn(4, dtype=dtype).to(device))]
            for p, gr in zip(remote, grads):
                p.grad = gr.to(device)
            arg = student.lib("builtins.iter").keep(remote) if as_iterator else remote
            norm = student.clip_grad_norm(arg, max_norm)
            what = "a one-shot iterator (like model.parameters())" if as_iterator else "a list"
            assert isinstance(norm, torch.Tensor) and norm.dim() == 0, "clip_grad_norm should return a 0-dim tensor"
            assert_close(norm, expected_norm, atol=0, rtol=1e-5, check_dtype=False,
                         what=f"the returned total norm (parameters given as {what})")
            for i, (p, q) in enumerate(zip(remote[:3], local[:3])):
                assert_close(p.grad, q.grad, atol=0, rtol=1e-5,
                             what=f"parameter {i}'s gradient after clipping (parameters given as {what}; one "
                                  "factor min(1, max_norm / total) for all gradients together)")
            assert remote[3].grad is None, "a parameter without a gradient should be left without one"


def suite_training_loop(oracle, data, steps, batch, max_lr, min_lr, warmup, wd, betas, clip):
    decay = [p for p in oracle.parameters() if p.dim() >= 2]
    no_decay = [p for p in oracle.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=max_lr, betas=betas)
    sched = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(opt, warmup, steps, min_lr_rate=min_lr / max_lr)
    P = oracle.config.n_positions
    x = data[:P].expand(batch, P)
    y = data[1:P + 1].expand(batch, P)
    oracle.train()
    losses = []
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = sched.lr_lambdas[0](it) * max_lr
        loss = F.cross_entropy(oracle(x).logits.reshape(-1, oracle.config.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(oracle.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


def test_train_loop_mechanics(student, device):
    V, P, C, L, H = 11, 8, 16, 2, 2
    oracle = gpt2_oracle(V, P, C, L, H, seed=95)
    model = student_gpt(student, device, oracle, V, P, C, L, H)
    data = torch.full((40,), 3, dtype=torch.long)
    settings = dict(max_lr=1e-2, min_lr=1e-3, warmup_iters=2, weight_decay=0.1, betas=(0.9, 0.99), max_grad_norm=0.05)
    gen = student.lib("torch.Generator").keep(device).manual_seed(0)
    losses = student.train(model, data.to(device), 5, 4, generator=gen, **settings)
    expected = suite_training_loop(oracle, data, 5, 4, 1e-2, 1e-3, 2, 0.1, (0.9, 0.99), 0.05)
    assert isinstance(losses, list) and len(losses) == 5 and all(isinstance(v, float) for v in losses), (
        "train should return the max_iters losses as a list of floats")
    assert_close(torch.tensor(losses), torch.tensor(expected), atol=0, rtol=1e-5,
                 what="the losses of 5 steps (warm-up 2, clipping at 0.05 active at every step)")
    assert model.training is True, "train should leave the model in train mode"
    state = model.state_dict()
    for name, value in convert(oracle.state_dict()).items():
        assert_close(state[name], value, atol=1e-6, rtol=1e-4, what=f"{name} after 5 training steps")


def test_train_end_to_end(student, device, shakespeare):
    text = shakespeare
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}   # the ids, not the student's tokenizer
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    V, P, C, L, H = 65, 32, 64, 2, 4
    with torch.random.fork_rng(devices=[]):     # GPT-2's initialisation, by transformers
        torch.manual_seed(1234)
        init = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0))
    model = student.GPT.keep(student_config(student, V, P, C, L, H))
    load_filled(model, convert(init.state_dict()), "GPT")
    model.to(device)
    gen = student.lib("torch.Generator").keep(device).manual_seed(0)
    student.train(model, train_ids.to(device), 1000, 32, 1e-2, 1e-3, 50, weight_decay=0.1, max_grad_norm=1.0,
                  generator=gen)
    model.eval()
    starts = torch.linspace(0, len(val_ids) - P - 1, 512).long()
    x = val_ids[starts[:, None] + torch.arange(P)]
    target = val_ids[starts + P]
    logits = logits_of(model(x.to(device))).cpu().float()
    loss = float(F.cross_entropy(logits[:, -1], target))
    assert loss <= 2.20, (f"after 1,000 steps the held-out cross-entropy of the next character is {loss:.3f} "
                          "(needs <= 2.20; a correct GPT reaches about 2.0)")


# -- generation --------------------------------------------------------------------------------------------


def hf_greedy(oracle, ids, max_new_tokens):
    oracle.generation_config.eos_token_id = None
    with torch.no_grad():
        return oracle.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                               pad_token_id=0, max_new_tokens=max_new_tokens)


def seeded(student, seed, device="cpu"):
    """A seeded torch.Generator in the student's process, on the model's device."""
    return student.lib("torch.Generator").keep(device).manual_seed(seed)


def as_ids(result, B, length, what):
    assert isinstance(result, torch.Tensor) and result.dtype == torch.long, f"{what} should return a LongTensor"
    assert_shape(result, (B, length), what)
    return result.cpu()


def test_generate_api(student, device):
    V, P, C, L, H = CONFIGS[1]
    model = student_gpt(student, device, gpt2_oracle(V, P, C, L, H, seed=100), V, P, C, L, H)
    prompt = ids_for(V, 2, 3, 1000)
    out = as_ids(student.generate(model, prompt.to(device), 5, generator=seeded(student, 0, device)), 2, 8, "generate")
    assert torch.equal(out[:, :3], prompt), "generate should return the prompt followed by the new tokens"
    assert ((out >= 0) & (out < V)).all(), "generated ids should lie in 0 .. vocab_size - 1"
    again = student.generate(model, prompt.to(device), 5, generator=seeded(student, 0, device)).cpu()
    assert torch.equal(out, again), "the same generator seed should give the same tokens"
    long_prompt = ids_for(V, 1, P + 5, 1001)
    out = as_ids(student.generate(model, long_prompt.to(device), 3, generator=seeded(student, 1, device)), 1, P + 8,
                 "generate with a prompt longer than block_size")
    assert torch.equal(out[:, :P + 5], long_prompt), "a prompt longer than block_size is kept whole in the output"
    assert torch.equal(student.generate(model, prompt.to(device), 0).cpu(), prompt), (
        "max_new_tokens=0 should return the prompt")
    assert model.training is False, "generate should leave the model's mode alone (eval stays eval)"
    model.train()
    student.generate(model, prompt.to(device), 2, generator=seeded(student, 2, device))
    assert model.training is True, "generate should leave the model's mode alone (train stays train)"
    model.eval()
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            student.generate(model, prompt.to(device), 2, temperature=bad)


def test_generate_greedy_matches_gpt2(student, device):
    for index, (V, P, C, L, H) in enumerate(CONFIGS):
        oracle = gpt2_oracle(V, P, C, L, H, seed=110 + index, init=1.0)
        model = student_gpt(student, device, oracle, V, P, C, L, H)
        prompt = ids_for(V, 2, 3, 1100 + index)
        expected = hf_greedy(oracle, prompt, P - 3)
        for use_cache in (True, False):
            out = as_ids(student.generate(model, prompt.to(device), P - 3, top_k=1, use_cache=use_cache,
                                          generator=seeded(student, 0, device)), 2, P, "generate")
            assert_equal(out, expected, what=f"greedy generation (top_k=1, use_cache={use_cache}) against "
                                             "transformers' generate")


def test_generate_past_block_size(student, device):
    V, P, C, L, H = CONFIGS[1]
    oracle = gpt2_oracle(V, P, C, L, H, seed=120, init=1.0)
    model = student_gpt(student, device, oracle, V, P, C, L, H)
    prompt = ids_for(V, 1, 3, 1200)
    n_new = 2 * P + 3
    ids = prompt.clone()
    for _ in range(n_new):    # crop to the last block_size tokens and recompute, every step
        logits = logits_of(model(ids[:, -P:].to(device))).cpu()
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        out = as_ids(student.generate(model, prompt.to(device), n_new, top_k=1, use_cache=use_cache,
                                      generator=seeded(student, 0, device)), 1, 3 + n_new, "generate")
        assert_equal(out, ids, what=f"greedy generation past block_size (use_cache={use_cache}; the model sees the "
                                    "last block_size tokens, and a full cache is recomputed from the cropped window)")
    sampled = [student.generate(model, prompt.to(device), n_new, temperature=1.5, use_cache=use_cache,
                                generator=seeded(student, 5, device)).cpu() for use_cache in (True, False)]
    assert torch.equal(sampled[0], sampled[1]), (
        "use_cache=True and use_cache=False should give the same sampled tokens for the same generator seed")


SAMPLING_CASES = [(1.0, None), (0.5, 5), (2.0, 3), (3.0, None)]


def test_generate_sampling_distribution(student, device):
    V, P, C, L, H = CONFIGS[0]
    oracle = gpt2_oracle(V, P, C, L, H, seed=130)
    model = student_gpt(student, device, oracle, V, P, C, L, H)
    prompt = ids_for(V, 1, 4, 1300)
    with torch.no_grad():
        logits = oracle(prompt).logits[0, -1]
    draws = 8000
    for case, (temperature, top_k) in enumerate(SAMPLING_CASES):
        out = as_ids(student.generate(model, prompt.expand(draws, 4).to(device), 1, temperature=temperature,
                                      top_k=top_k, generator=seeded(student, 10 + case, device)), draws, 5, "generate")
        scaled = logits / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[-1], float("-inf"))
        probs = scaled.softmax(-1)
        freq = torch.bincount(out[:, -1], minlength=V).double() / draws
        setting = f"temperature={temperature}, top_k={top_k}"
        assert (freq[probs == 0] == 0).all(), f"generate ({setting}) drew a token outside the top k"
        worst = float((freq - probs).abs().max())
        assert worst <= 0.025, (f"generate ({setting}): over {draws} draws of one token, a token's frequency is "
                                f"{worst:.3f} away from softmax(logits / temperature) restricted to the top k")


def count_flops(student, device, model, prompt, n_new, use_cache, seed):
    mode = student.lib("torch.utils.flop_counter.FlopCounterMode").keep(display=False)
    stack = student.lib("contextlib.ExitStack").keep()
    stack.enter_context(mode)
    try:
        out = student.generate(model, prompt, n_new, use_cache=use_cache, generator=seeded(student, seed, device))
    finally:
        stack.close()
    return mode.get_total_flops(), out


def test_generate_uses_cache(student, device):
    V, P, C, L, H = 65, 128, 32, 2, 4
    model = student_gpt(student, device, None, V, P, C, L, H, torch.float32)
    prompt = torch.tensor([[5]], device=device)
    cached, a = count_flops(student, device, model, prompt, 100, True, 3)
    uncached, b = count_flops(student, device, model, prompt, 100, False, 3)
    assert torch.equal(a.cpu(), b.cpu()), "use_cache=True and False should give the same tokens"
    assert uncached > 0, "generate without the cache should run the model"
    ratio = cached / uncached
    assert ratio <= 0.25, (f"generating 100 tokens with use_cache=True costs {ratio:.2f} of the FLOPs of "
                           "use_cache=False: with a cache each step should feed only the newest token")
