"""Hidden suite for lab 06: decoding strategies.

Oracles, all computed here in the grader's process with `transformers`:
- greedy decoding and beam search: `GPT2LMHeadModel.generate` on tiny seeded GPT-2s built from a
  config (no download). The student's process builds the same architecture from its own
  `transformers` and loads the oracle's state dict. A "plain callable returning logits" is an
  `nn.Sequential` of library modules (Embedding, LayerNorm, Linear) in the student's process; its
  oracle is a 0-layer GPT-2 with the same weights (position embeddings zeroed), which computes the
  same function. The beam-search toy models (next-token logits depend on the last token only) are
  `nn.Sequential(nn.Embedding)` with a hand-set table; their oracle is a 0-layer GPT-2 whose final
  LayerNorm is replaced by the identity, so that its logits are the table's rows.
- the filters: `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`
  (min_tokens_to_keep=1), in float64, on the very values the student receives. Top-p cases use
  probabilities that are powers of two and thresholds p well away from every cumulative sum (and
  from ties straddling the threshold), so that no answer hangs on rounding or sort order.
- sampling: the support and the distribution given by the three warpers in order; the frequencies
  of 10,000 seeded draws per distribution must stay within 5 standard deviations of it (per token),
  and every kept token with probability >= 0.01 must come up in 3,000 draws. The draws use a
  `torch.Generator` created in the student's process, so a correct implementation is deterministic.
"""
from __future__ import annotations

import math
import numbers

import pytest
import torch

from coursekit.testing import assert_close, assert_equal

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, TemperatureLogitsWarper,  # noqa: E402
                          TopKLogitsWarper, TopPLogitsWarper)

transformers.logging.set_verbosity_error()

V = 48          # vocabulary of the tiny GPT-2s


# -- models ----------------------------------------------------------------------------------------


def gpt2_kwargs(vocab_size=V, n_layer=2, n_embd=32, **extra) -> dict:
    """Explicit special ids; initializer_range 0.3 spreads the logits so that no two tokens are
    nearly tied (GPT-2's 0.02 would make every arg-max a coin toss on float noise)."""
    kwargs = dict(vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=4,
                  initializer_range=0.3, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                  pad_token_id=vocab_size - 1)
    kwargs.update(extra)
    return kwargs


def oracle_gpt2(seed: int, **kwargs) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**kwargs))
    return model.eval()


def student_gpt2(student, oracle: GPT2LMHeadModel, kwargs: dict, device):
    """The same GPT-2, built in the student's process from its own transformers."""
    config = student.lib("transformers.GPT2Config")(**kwargs)
    model = student.lib("transformers.GPT2LMHeadModel")(config)
    model.load_state_dict(oracle.state_dict())
    model.eval()
    model.to(device)
    return model


def student_sequential(student, modules: list[tuple[str, tuple, dict]], state: dict, device):
    """nn.Sequential of library modules in the student's process, weights loaded from `state`."""
    parts = [student.lib(f"torch.nn.{name}")(*args, **kwargs) for name, args, kwargs in modules]
    model = student.lib("torch.nn.Sequential")(*parts)
    model.load_state_dict(state)
    model.eval()
    model.to(device)
    return model


def zero_layer_gpt2(vocab_size: int, n_embd: int, wte, ln_f=None, lm_head=None) -> GPT2LMHeadModel:
    """A GPT-2 without blocks: logits = lm_head(ln_f(wte[token])) at every position (the position
    embeddings are zero). ln_f=None replaces the final LayerNorm by the identity."""
    config = GPT2Config(**gpt2_kwargs(vocab_size=vocab_size, n_layer=0, n_embd=n_embd, n_head=1,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0))
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(wte)
        model.transformer.wpe.weight.zero_()
        model.lm_head.weight.copy_(torch.eye(vocab_size) if lm_head is None else lm_head)
        if ln_f is None:
            model.transformer.ln_f = torch.nn.Identity()
        else:
            model.transformer.ln_f.weight.copy_(ln_f[0])
            model.transformer.ln_f.bias.copy_(ln_f[1])
    return model


def hf_generate(model, ids, eos, **kwargs):
    """model.generate with an explicit EOS: None means none (not the config's default)."""
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=eos,
                              pad_token_id=model.config.pad_token_id, **kwargs)


def hf_greedy(model, ids, max_new_tokens, eos=None):
    return hf_generate(model, ids, eos, do_sample=False, max_new_tokens=max_new_tokens)


def hf_beam(model, ids, num_beams, max_new_tokens, length_penalty, eos):
    out = hf_generate(model, ids, eos, do_sample=False, num_beams=num_beams, early_stopping=True,
                      length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                      return_dict_in_generate=True, output_scores=True)
    return out.sequences, float(out.sequences_scores[0])


def prompt_ids(seed: int, length: int, vocab_size: int = V, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab_size - 1, (batch, length), generator=g)


def early_eos(sequence: torch.Tensor, prompt_len: int, earliest: int = 2) -> int:
    """A token that the run without EOS first emits at generated position `earliest` or later (else
    the latest new token before it): with it as the EOS, generation stops early."""
    generated = sequence[0, prompt_len:].tolist()
    first_seen = [j for j in range(len(generated)) if generated[j] not in generated[:j]]
    later = [j for j in first_seen if j >= earliest]
    return generated[later[0] if later else first_seen[-1]]


def as_ids(result, what: str) -> torch.Tensor:
    assert isinstance(result, torch.Tensor), f"{what} should return a LongTensor, got {type(result).__name__}"
    assert result.dtype == torch.long, f"{what} should return a LongTensor (int64), got {result.dtype}"
    return result.cpu()


def check_sequence(actual, expected: torch.Tensor, what: str) -> None:
    actual = as_ids(actual, what)
    assert actual.dim() == 2 and actual.shape[0] == expected.shape[0], (
        f"{what} should return shape (batch, L + n), got {tuple(actual.shape)}")
    assert actual.shape[1] == expected.shape[1], (
        f"{what}: length {actual.shape[1]} (prompt included) where transformers' generate gives length "
        f"{expected.shape[1]}")
    assert_equal(actual, expected, what=what)


# -- greedy decoding ---------------------------------------------------------------------------------

GREEDY_CASES = [  # (seed, prompt length, max_new_tokens)
    (0, 1, 12), (1, 4, 15), (2, 7, 10), (3, 3, 20),
]


@pytest.mark.parametrize("seed,prompt_len,max_new", GREEDY_CASES)
def test_greedy_matches_generate(student, device, seed, prompt_len, max_new):
    kwargs = gpt2_kwargs()
    oracle = oracle_gpt2(seed, **kwargs)
    ids = prompt_ids(seed, prompt_len)
    expected = hf_greedy(oracle, ids, max_new)
    model = student_gpt2(student, oracle, kwargs, device)
    actual = student.greedy_decode(model, ids.to(device), max_new)
    check_sequence(actual, expected, f"greedy_decode (no EOS, {max_new} new tokens)")


@pytest.mark.parametrize("seed,prompt_len,max_new", GREEDY_CASES)
def test_greedy_stops_at_eos(student, device, seed, prompt_len, max_new):
    kwargs = gpt2_kwargs()
    oracle = oracle_gpt2(seed, **kwargs)
    ids = prompt_ids(seed, prompt_len)
    eos = early_eos(hf_greedy(oracle, ids, max_new), prompt_len, earliest=1 + seed % 3)
    expected = hf_greedy(oracle, ids, max_new, eos=eos)
    model = student_gpt2(student, oracle, kwargs, device)
    actual = student.greedy_decode(model, ids.to(device), max_new, eos_token_id=eos)
    check_sequence(actual, expected, "greedy_decode with an EOS that is reached early "
                                     "(it should stop right after emitting it)")
    # an EOS that is never produced changes nothing
    unused = next(t for t in range(V) if t not in hf_greedy(oracle, ids, max_new)[0].tolist())
    actual = student.greedy_decode(model, ids.to(device), max_new, eos_token_id=unused)
    check_sequence(actual, hf_greedy(oracle, ids, max_new, eos=unused),
                   "greedy_decode with an EOS that is never generated")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_plain_callable(student, device, seed):
    """Sequential(Embedding, LayerNorm, Linear): a plain callable returning logits (B, L, V)."""
    vocab, width = 24, 16
    g = torch.Generator().manual_seed(50 + seed)
    wte = torch.randn(vocab, width, generator=g)
    ln = (1 + 0.2 * torch.randn(width, generator=g), 0.2 * torch.randn(width, generator=g))
    head = torch.randn(vocab, width, generator=g)
    oracle = zero_layer_gpt2(vocab, width, wte, ln_f=ln, lm_head=head)
    model = student_sequential(
        student,
        [("Embedding", (vocab, width), {}), ("LayerNorm", (width,), {}), ("Linear", (width, vocab), {"bias": False})],
        {"0.weight": wte, "1.weight": ln[0], "1.bias": ln[1], "2.weight": head}, device)
    ids = prompt_ids(seed, 3, vocab_size=vocab)
    expected = hf_greedy(oracle, ids, 10)
    check_sequence(student.greedy_decode(model, ids.to(device), 10), expected,
                   "greedy_decode on a plain callable returning logits")
    eos = early_eos(expected, 3, earliest=1)
    check_sequence(student.greedy_decode(model, ids.to(device), 10, eos_token_id=eos),
                   hf_greedy(oracle, ids, 10, eos=eos),
                   "greedy_decode with an EOS on a plain callable returning logits")


# -- the filters -------------------------------------------------------------------------------------


def check_filtered(actual, expected: torch.Tensor, what: str, tol: float = 0.0) -> None:
    """Same shape and dtype, -inf exactly where the reference has it, kept logits unchanged."""
    assert isinstance(actual, torch.Tensor), f"{what} should return a tensor, got {type(actual).__name__}"
    actual = actual.detach().cpu()
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what} returned shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    assert actual.dtype == expected.dtype, f"{what} returned dtype {actual.dtype}, expected {expected.dtype}"
    removed, expected_removed = torch.isneginf(actual), torch.isneginf(expected)
    if not torch.equal(removed, expected_removed):
        rows = [r for r in range(actual.shape[0]) if not torch.equal(removed[r], expected_removed[r])]
        r = rows[0]
        kept, expected_kept = int((~removed[r]).sum()), int((~expected_removed[r]).sum())
        detail = (f"it keeps {kept} tokens where the reference keeps {expected_kept}" if kept != expected_kept
                  else f"it keeps {kept} tokens, as the reference does, but not the same ones")
        raise AssertionError(f"{what}: wrong set of tokens set to -inf in {len(rows)} of {actual.shape[0]} rows; "
                             f"in row {r}, {detail}")
    kept = ~expected_removed
    assert_close(actual[kept], expected[kept], atol=0.0, rtol=tol, what=f"{what} (the kept logits)")


def random_logits(seed: int, rows: int, vocab: int, dtype, neg_inf: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    if neg_inf:
        for r in range(rows):
            logits[r, torch.randperm(vocab, generator=g)[:neg_inf]] = float("-inf")
    return logits.to(dtype)


TEMPERATURES = [0.5, 1.0, 2.0, 0.7, 3]   # 3: an int is a number too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_apply_temperature(student, device, dtype, temperature):
    logits = random_logits(7, 4, 30, dtype, neg_inf=3)
    expected = TemperatureLogitsWarper(float(temperature))(None, logits)
    actual = student.apply_temperature(logits.to(device), temperature)
    check_filtered(actual, expected, f"apply_temperature(logits, {temperature})",
                   tol=1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, -0.5])
def test_temperature_rejects_non_positive(student, device, temperature):
    logits = random_logits(8, 2, 10, torch.float32).to(device)
    with pytest.raises(ValueError):
        student.apply_temperature(logits, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 7, 40, 100])
def test_top_k_filter(student, device, dtype, k):
    logits = random_logits(9 + k, 5, 40, dtype)
    expected = TopKLogitsWarper(k)(None, logits)
    check_filtered(student.top_k_filter(logits.to(device), k), expected, f"top_k_filter(logits, k={k}) (V=40)")


TIED = torch.tensor([
    [3.0, 1.0, 1.0, 1.0, 0.0, -2.0, 0.5, 1.0],     # four tokens tied at 1.0: ranks 2 to 5
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],      # everything tied
    [2.5, 2.5, 2.5, -1.0, -1.0, 0.25, 0.25, 0.25],  # ties at the top, and lower down
    [-0.5, 4.0, -0.5, 2.0, -0.5, 2.0, -3.0, 1.5],
])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_top_k_ties(student, device, k):
    for dtype in (torch.float32, torch.float64):
        logits = TIED.to(dtype)
        expected = TopKLogitsWarper(k)(None, logits)
        check_filtered(student.top_k_filter(logits.to(device), k), expected,
                       f"top_k_filter(logits, k={k}) on rows with tied logits (every token tied with the "
                       "k-th largest must be kept)")


@pytest.mark.parametrize("k", [0, -1])
def test_top_k_rejects_non_positive(student, device, k):
    with pytest.raises(ValueError):
        student.top_k_filter(random_logits(10, 2, 10, torch.float32).to(device), k)


# Multisets of power-of-two probabilities; each batch row is a permutation of one of them, given
# as log-probabilities plus a random offset (only the softmax matters).
DYADIC = {
    "A": [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 7)],
    "B": [2.0 ** -e for e in (2, 2, 3, 3, 4, 4, 5, 5, 5, 5)],          # ties everywhere
    "C": [31 / 32] + [2.0 ** -e for e in (6, 7, 8, 9, 10, 10)],         # one dominant token
}


def dyadic_logits(name: str, seed: int, rows: int, dtype, neg_inf_cols: int = 0) -> torch.Tensor:
    probs = torch.tensor(DYADIC[name], dtype=torch.float64)
    assert abs(float(probs.sum()) - 1.0) < 1e-15
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        row = probs.log()[torch.randperm(len(probs), generator=g)]
        row = row + (torch.rand((), generator=g, dtype=torch.float64) * 10 - 5)
        if neg_inf_cols:
            row = torch.cat([row, torch.full((neg_inf_cols,), float("-inf"), dtype=torch.float64)])
            row = row[torch.randperm(len(row), generator=g)]
        out.append(row)
    return torch.stack(out).to(dtype)


def safe_p(name: str, p: float) -> bool:
    """p is at least 1e-3 away from every cumulative sum and the token that crosses it is not tied
    with the next one (a tie straddling the threshold makes the kept set depend on sort order)."""
    probs = sorted(DYADIC[name], reverse=True)
    cum = [sum(probs[: i + 1]) for i in range(len(probs))]
    if any(abs(p - c) < 1e-3 for c in cum[:-1]):
        return False
    crossing = next(i for i, c in enumerate(cum) if c >= p - 1e-12)
    return crossing == len(probs) - 1 or probs[crossing] != probs[crossing + 1]


TOP_P_CASES = [("A", 0.3), ("A", 0.6), ("A", 0.8), ("A", 0.9), ("A", 0.95), ("A", 0.975), ("A", 0.995),
               ("B", 0.4), ("B", 0.7), ("B", 0.85), ("B", 0.99)]
TOP_P_EXTREMES = [("A", 1e-4), ("A", 0.9999), ("A", 1.0), ("C", 1e-4), ("C", 0.5), ("C", 0.9), ("C", 0.97),
                  ("C", 0.99)]


def run_top_p(student, device, name, p, seed):
    assert safe_p(name, p), "test setup: unsafe case"
    for dtype, neg_inf in ((torch.float32, 0), (torch.float64, 3)):
        logits = dyadic_logits(name, seed, 6, dtype, neg_inf_cols=neg_inf)
        expected = TopPLogitsWarper(p)(None, logits.double()).to(dtype)
        expected = logits.masked_fill(torch.isneginf(expected), float("-inf"))
        check_filtered(student.top_p_filter(logits.to(device), p), expected,
                       f"top_p_filter(logits, p={p}) ({dtype}, rows of power-of-two probabilities"
                       f"{', some logits already -inf' if neg_inf else ''})")


@pytest.mark.parametrize("name,p", TOP_P_CASES)
def test_top_p_filter(student, device, name, p):
    run_top_p(student, device, name, p, seed=int(p * 1000) + ord(name))


@pytest.mark.parametrize("name,p", TOP_P_EXTREMES)
def test_top_p_extremes(student, device, name, p):
    run_top_p(student, device, name, p, seed=int(p * 1000) + ord(name) + 1)


# -- sampling ---------------------------------------------------------------------------------------


def filtered_probs(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """The distribution sample_next_token draws from, by transformers' warpers in float64."""
    scores = logits.double()
    scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def sample_rows(seed: int) -> torch.Tensor:
    """Two next-token distributions over 20 tokens, with no near-boundary cases for the settings below."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 20, generator=g, dtype=torch.float64) * 1.5).float()


SAMPLE_SETTINGS = [
    dict(top_k=4),
    dict(top_p=0.6),
    dict(temperature=2.5, top_p=0.6),             # the nucleus depends on the temperature
    dict(top_k=6, top_p=0.5),                     # top-p on the renormalised top-k distribution
    dict(temperature=0.5, top_k=0),               # top_k=0: no top-k
    dict(temperature=1.3, top_k=8, top_p=0.8),
]


def student_generator(student, device, seed: int):
    gen = student.lib("torch.Generator")(device=device)
    gen.manual_seed(seed)
    return gen


def draw(student, device, rows: torch.Tensor, n: int, settings: dict, seed: int) -> torch.Tensor:
    """n draws from each of the rows (one call, logits (n * rows, V)), as (rows, n). The repeated
    logits are built in the student's process (a handle), which saves sending megabytes."""
    logits = student.lib("torch.repeat_interleave").keep(rows.to(device), n, dim=0)
    draws = student.sample_next_token(logits, **settings, generator=student_generator(student, device, seed))
    logits = rows.repeat_interleave(n, dim=0)  # the same, here, for the messages below
    draws = as_ids(draws, "sample_next_token")
    assert tuple(draws.shape) == (logits.shape[0],), (
        f"sample_next_token on logits of shape {tuple(logits.shape)} should return shape ({logits.shape[0]},), "
        f"got {tuple(draws.shape)}")
    assert ((draws >= 0) & (draws < rows.shape[1])).all(), "sample_next_token returned ids outside the vocabulary"
    return draws.reshape(rows.shape[0], n)


@pytest.mark.parametrize("case", range(len(SAMPLE_SETTINGS)))
def test_sample_support(student, device, case):
    settings = SAMPLE_SETTINGS[case]
    rows = sample_rows(20 + case)
    expected = filtered_probs(rows, **settings)
    draws = draw(student, device, rows, 3000, settings, seed=case)
    for r in range(rows.shape[0]):
        drawn = torch.bincount(draws[r], minlength=rows.shape[1])
        outside = int(((drawn > 0) & (expected[r] == 0)).sum())
        assert outside == 0, (
            f"sample_next_token with {settings}: drew {outside} token(s) that the filters remove "
            "(order: temperature, then top-k, then top-p)")
        missing = int(((drawn == 0) & (expected[r] >= 0.01)).sum())
        assert missing == 0, (
            f"sample_next_token with {settings}: {missing} token(s) that the filters keep never came up in "
            "3,000 draws (order: temperature, then top-k, then top-p)")


@pytest.mark.parametrize("case", range(len(SAMPLE_SETTINGS)))
def test_sample_frequencies(student, device, case):
    settings = SAMPLE_SETTINGS[case]
    rows = sample_rows(20 + case)
    expected = filtered_probs(rows, **settings)
    n = 10_000
    draws = draw(student, device, rows, n, settings, seed=100 + case)
    for r in range(rows.shape[0]):
        counts = torch.bincount(draws[r], minlength=rows.shape[1]).double()
        mean = n * expected[r]
        sd = (n * expected[r] * (1 - expected[r])).sqrt()
        z = ((counts - mean).abs() - 1e-9) / sd.clamp_min(1e-12)
        worst = int(torch.argmax(z))
        assert float(z[worst]) <= 5.0, (
            f"sample_next_token with {settings}: token {worst} came up {int(counts[worst])} times in {n} "
            f"draws, {float(z[worst]):.1f} standard deviations from the filtered distribution")
    again = draw(student, device, rows, n, settings, seed=100 + case)
    assert torch.equal(draws, again), (
        "sample_next_token gave different draws for two generators seeded alike: pass `generator` "
        "to torch.multinomial")
    other = draw(student, device, rows, n, settings, seed=200 + case)
    assert not torch.equal(draws, other), (
        "sample_next_token gave the same draws for generators seeded differently: pass `generator` "
        "to torch.multinomial")


# -- beam search ------------------------------------------------------------------------------------


def check_beam(result, expected_seq: torch.Tensor, expected_score: float, what: str) -> None:
    assert isinstance(result, (tuple, list)) and len(result) == 2, (
        f"{what}: beam_search should return a tuple (sequence, score)")
    seq, score = result
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = float(score)
    assert isinstance(score, numbers.Real), f"{what}: the score should be a float, got {type(score).__name__}"
    check_sequence(seq, expected_seq, f"{what}: the returned sequence")
    assert math.isfinite(score) and math.isclose(score, expected_score, rel_tol=1e-4, abs_tol=1e-6), (
        f"{what}: the sequence is right but its score differs from transformers' sequences_scores by "
        f"{abs(score - expected_score):.3g} (relative tolerance 1e-4)")


BEAM_CASES = [  # (seed, num_beams, length_penalty, EOS: None or the greedy token at that position)
    (0, 2, 1.0, None), (1, 3, 1.0, 2), (2, 4, 2.0, 1), (3, 5, 0.0, 2), (4, 3, -0.5, 1), (5, 2, 1.5, 3),
    (6, 4, 1.0, None),
]


@pytest.mark.parametrize("seed,num_beams,length_penalty,eos_pos", BEAM_CASES)
def test_beam_search_gpt2(student, device, seed, num_beams, length_penalty, eos_pos):
    kwargs = gpt2_kwargs()
    oracle = oracle_gpt2(seed, **kwargs)
    ids = prompt_ids(100 + seed, 3 + seed % 3)
    eos = None if eos_pos is None else int(hf_greedy(oracle, ids, 10)[0, ids.shape[1] + eos_pos])
    expected_seq, expected_score = hf_beam(oracle, ids, num_beams, 10, length_penalty, eos)
    model = student_gpt2(student, oracle, kwargs, device)
    result = student.beam_search(model, ids.to(device), num_beams, 10, length_penalty=length_penalty,
                                 eos_token_id=eos)
    check_beam(result, expected_seq, expected_score,
               f"beam_search(num_beams={num_beams}, length_penalty={length_penalty}, "
               f"{'no EOS' if eos is None else 'with an EOS'})")


EOS = 0
S, A, B, C, D, E, F_ = 1, 2, 3, 4, 5, 6, 7
TOY_V = 8
TOYS = {
    # after the prompt: "a EOS" (short, likely) against "b c d EOS" (longer, likelier per token)
    "length": dict(rows={S: {A: .55, B: .35}, A: {EOS: .9}, B: {C: .97}, C: {D: .97}, D: {EOS: .97}},
                   prompt=[7, 6, S], num_beams=2, max_new=6),
    # both first-step beams end at step 2; the long chain after b would win if the search went on
    "early": dict(rows={S: {A: .5, B: .45}, A: {EOS: .9}, B: {EOS: .86, C: .12}, C: {D: .99}, D: {E: .99},
                        E: {F_: .99}, F_: {EOS: .99}},
                  prompt=[6, S], num_beams=2, max_new=8),
    # an EOS right after the prompt ranks 3rd of the 2 * 2 candidates: it must not count
    "rank": dict(rows={S: {A: .37, B: .33, EOS: .27}}, prompt=[5, S], num_beams=2, max_new=4),
}


def toy_table(name: str) -> torch.Tensor:
    """Next-token logits (V, V): the given transitions, the rest of each row's mass spread unevenly
    (no ties) over the other tokens, EOS only where a row names it, and a random offset per row
    (so raw logits are not log-probabilities)."""
    g = torch.Generator().manual_seed(len(name))
    probs = torch.zeros(TOY_V, TOY_V, dtype=torch.float64)
    for src in range(TOY_V):
        given = dict(TOYS[name]["rows"].get(src, {}))
        given.setdefault(EOS, 0.002)
        rest = [t for t in range(TOY_V) if t not in given]
        w = torch.rand(len(rest), generator=g, dtype=torch.float64) * 0.4 + 0.8
        probs[src, rest] = w / w.sum() * (1 - sum(given.values()))
        for dst, p in given.items():
            probs[src, dst] = p
    offsets = torch.randn(TOY_V, 1, generator=g, dtype=torch.float64) * 3
    return (probs.log() + offsets).float()


def run_toy(student, device, name, length_penalty, what):
    toy = TOYS[name]
    table = toy_table(name)
    oracle = zero_layer_gpt2(TOY_V, TOY_V, table)
    ids = torch.tensor([toy["prompt"]])
    expected_seq, expected_score = hf_beam(oracle, ids, toy["num_beams"], toy["max_new"], length_penalty, EOS)
    model = student_sequential(student, [("Embedding", (TOY_V, TOY_V), {})], {"0.weight": table}, device)
    result = student.beam_search(model, ids.to(device), toy["num_beams"], toy["max_new"],
                                 length_penalty=length_penalty, eos_token_id=EOS)
    check_beam(result, expected_seq, expected_score, f"beam_search on a toy model where {what} "
               f"(num_beams={toy['num_beams']}, length_penalty={length_penalty})")


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -1.0])
def test_beam_search_length_normalisation(student, device, length_penalty):
    run_toy(student, device, "length", length_penalty,
            "length normalisation decides between a short and a long hypothesis")


@pytest.mark.parametrize("name,length_penalty", [("early", 1.0), ("early", 2.0), ("rank", 0.0), ("rank", 1.0),
                                                 ("rank", -1.0)])
def test_beam_search_early_eos(student, device, name, length_penalty):
    what = {"early": "every beam ends in EOS early (the search stops once num_beams hypotheses are finished)",
            "rank": "an EOS candidate ranks below the first num_beams (it must not count)"}[name]
    run_toy(student, device, name, length_penalty, what)


# -- generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["greedy", "beam", "beam-default", "sample-top1"])
def test_generate_dispatch(student, device, case):
    kwargs = gpt2_kwargs()
    oracle = oracle_gpt2(30, **kwargs)
    ids = prompt_ids(30, 4)
    model = student_gpt2(student, oracle, kwargs, device)
    if case == "greedy":
        eos = early_eos(hf_greedy(oracle, ids, 12), 4)
        actual = student.generate(model, ids.to(device), 12, strategy="greedy", eos_token_id=eos)
        expected = hf_greedy(oracle, ids, 12, eos=eos)
    elif case == "beam":
        eos = int(hf_greedy(oracle, ids, 12)[0, 4 + 2])
        actual = student.generate(model, ids.to(device), 12, strategy="beam", num_beams=3, length_penalty=1.5,
                                  eos_token_id=eos)
        expected, _ = hf_beam(oracle, ids, 3, 12, 1.5, eos)
    elif case == "beam-default":
        actual = student.generate(model, ids.to(device), 8, strategy="beam")
        expected, _ = hf_beam(oracle, ids, 4, 8, 1.0, None)
    else:  # top_k=1 leaves a single token: sampling is greedy decoding
        actual = student.generate(model, ids.to(device), 12, strategy="sample", top_k=1,
                                  generator=student_generator(student, device, 0))
        expected = hf_greedy(oracle, ids, 12)
    check_sequence(actual, expected, f"generate(strategy={case.split('-')[0]!r})")


@pytest.mark.parametrize("settings", [dict(temperature=0.9, top_k=3), dict(temperature=0.7, top_p=0.5)],
                         ids=["top_k", "top_p"])
def test_generate_sample(student, device, settings):
    """A batch of three prompts; every sampled token must be allowed by the filters given its prefix."""
    kwargs = gpt2_kwargs()
    oracle = oracle_gpt2(31, **kwargs)
    ids = prompt_ids(31, 4, batch=3)
    model = student_gpt2(student, oracle, kwargs, device)
    out = student.generate(model, ids.to(device), 8, strategy="sample", **settings,
                           generator=student_generator(student, device, 7))
    out = as_ids(out, "generate(strategy='sample')")
    assert tuple(out.shape) == (3, 12), (
        f"generate(strategy='sample') on a batch of 3 prompts of length 4 with max_new_tokens=8 (no EOS) "
        f"should return shape (3, 12), got {tuple(out.shape)}")
    assert torch.equal(out[:, :4], ids), "generate(strategy='sample') should return the prompts followed by the new tokens"
    with torch.no_grad():
        logits = oracle(out).logits[:, 3:-1].double()  # the logits that chose tokens 4..11
    scores = logits / settings["temperature"]
    for row in range(3):
        for step in range(8):
            z = scores[row, step]
            token = int(out[row, 4 + step])
            if "top_k" in settings:
                allowed = z[token] >= torch.topk(z, settings["top_k"]).values[-1] - 1e-4
            else:
                probs = z.softmax(-1)
                allowed = float(probs[probs > probs[token]].sum()) < settings["top_p"] + 1e-4
            assert allowed, (f"generate(strategy='sample', {settings}): row {row}, new token {step} is not "
                             "allowed by the filters given the tokens before it")
