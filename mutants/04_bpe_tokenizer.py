"""Plausible wrong implementations of lab 04 (byte-level BPE from scratch).

The first ones (always=True) are graded on every test run; the others are further mistakes students
make, each aimed at one part of the contract so that every hidden test is shown to have teeth.
"""
from mutants.mutation import Mutant

# The solution's incremental merge loop, replaced whole by the recount-everything mutant.
_INCREMENTAL_LOOP = '''    while len(merges) < num_merges and pair_counts:
        top = max(pair_counts.values())
        best = max(pair for pair, count in pair_counts.items() if count == top)  # ties: greatest pair
        merges.append(best)
        # Only the words containing `best` change; re-count exactly those.
        for i in pair_to_words.pop(best):
            tokens, freq = words[i], freqs[i]
            for pair in zip(tokens, tokens[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            tokens = merge_pair(tokens, best)
            words[i] = tokens
            for pair in zip(tokens, tokens[1:]):
                pair_counts[pair] += freq
                pair_to_words[pair].add(i)
'''

_RECOUNT_LOOP = '''    while len(merges) < num_merges:
        pair_counts = defaultdict(int)
        for tokens, freq in zip(words, freqs):
            for pair in zip(tokens, tokens[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        words = [merge_pair(tokens, best) for tokens in words]
'''

MUTANTS = [
    # -- always graded --------------------------------------------------------------------------
    Mutant(
        name="ties_first_occurrence",
        why="Ties between equally frequent pairs go to the first pair found in the counts (dict order) "
            "instead of the lexicographically greatest pair.",
        patches=[(
            "best = max(pair for pair, count in pair_counts.items() if count == top)",
            "best = next(pair for pair, count in pair_counts.items() if count == top)",
        )],
        loses=["test_train_ties", "test_train_tinyshakespeare_merges"], always=True,
    ),
    Mutant(
        name="ties_smallest_pair",
        why="Ties go to the smallest pair (what tokenizers' BpeTrainer does) instead of the greatest.",
        patches=[(
            "best = max(pair for pair, count in pair_counts.items() if count == top)",
            "best = min(pair for pair, count in pair_counts.items() if count == top)",
        )],
        loses=["test_train_ties", "test_train_tinyshakespeare_merges"], always=True,
    ),
    Mutant(
        name="overlapping_pairs_counted_once",
        why="Each distinct pair is counted once per word (a set of pairs), so 'aaaa' gives (a, a) one "
            "count instead of three.",
        patches=[
            ('        for pair in zip(tokens, tokens[1:]):  # overlapping pairs: "aaaa" gives (a, a) three times',
             '        for pair in set(zip(tokens, tokens[1:])):'),
            ("            for pair in zip(tokens, tokens[1:]):\n                pair_counts[pair] -= freq",
             "            for pair in set(zip(tokens, tokens[1:])):\n                pair_counts[pair] -= freq"),
            ("            for pair in zip(tokens, tokens[1:]):\n                pair_counts[pair] += freq",
             "            for pair in set(zip(tokens, tokens[1:])):\n                pair_counts[pair] += freq"),
        ],
        loses=["test_train_overlapping_pairs"], always=True,
    ),
    Mutant(
        name="overlapping_merge",
        why="merge_pair advances one position after a merge, so in 'aaa' the middle 'a' is used by two "
            "merges ('aa', 'aa') instead of giving 'aa', 'a'.",
        patches=[(
            "i += 2  # both halves are used up: an overlapping occurrence cannot reuse `second`",
            "i += 1",
        )],
        loses=["test_train_overlapping_pairs"], always=True,
    ),
    Mutant(
        name="merges_cross_pretokens",
        why="Training skips the GPT-2 pre-tokenizer and counts pairs over whole lines, so merges cross "
            "word and punctuation boundaries (whole lines rather than whole chunks keep the mutant fast "
            "enough to grade).",
        patches=[("word_counts.update(pretokenize(piece))", "word_counts.update(piece.splitlines(keepends=True))")],
        loses=["test_train_pretoken_boundaries", "test_train_tinyshakespeare_merges"], always=True,
    ),
    Mutant(
        name="special_tokens_trained_on",
        why="Training does not cut the text at special tokens, so their characters take part in merges.",
        patches=[("split_on_special_tokens(text, specials)", "[text]")],
        loses=["test_train_special_tokens"], always=True,
    ),
    Mutant(
        name="special_tokens_encoded_as_text",
        why="encode does not cut the text at special tokens first, so they are pre-tokenized and merged "
            "like ordinary text.",
        patches=[("split_on_special_tokens(text, self.special_tokens)", "[text]")],
        loses=["test_special_tokens_encode", "test_gpt2_encode_matches_tokenizers"],
    ),
    Mutant(
        name="encode_by_frequency",
        why="encode merges the pair that occurs most often in the current pre-token instead of the "
            "pair with the lowest rank (earliest learned).",
        patches=[(
            'best = min(zip(tokens, tokens[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))',
            "pairs = list(zip(tokens, tokens[1:]))\n"
            "            best = max(pairs, key=lambda pair: (pair in self.ranks, pairs.count(pair)))",
        )],
        loses=["test_encode_applies_merges_by_rank", "test_gpt2_encode_matches_tokenizers"], always=True,
    ),
    Mutant(
        name="decode_token_by_token",
        why="decode turns each token into a str on its own, so a character split across tokens becomes "
            "replacement characters.",
        patches=[(
            'return b"".join(self.vocab[int(i)] for i in ids).decode("utf-8", errors="replace")',
            'return "".join(self.vocab[int(i)].decode("utf-8", errors="replace") for i in ids)',
        )],
        loses=["test_decode_split_multibyte", "test_gpt2_decode"], always=True,
    ),
    Mutant(
        name="regex_without_contractions",
        why="The GPT-2 pattern without its contraction alternatives: \"don't\" is split don / ' / t.",
        patches=[(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+", r" ?\p{L}+")],
        loses=["test_gpt2_encode_matches_tokenizers", "test_train_pretoken_boundaries"], always=True,
    ),
    Mutant(
        name="recount_every_merge",
        why="A correct trainer that recounts every pair of every word after each merge: same merges, "
            "far too slow on a real corpus.",
        patches=[(_INCREMENTAL_LOOP, _RECOUNT_LOOP)],
        loses=["test_train_tinyshakespeare_speed"], always=True,
    ),
    Mutant(
        name="special_token_uses_byte_id",
        why="encode gives a special token the smallest id whose bytes match it (the first one found), "
            "so the special '|' encodes to the byte token's id 124 instead of its own id after the merges.",
        patches=[("ids.append(self.special_ids[piece])",
                  'ids.append(self.token_to_id[piece.encode("utf-8")])')],
        loses=["test_special_tokens_encode"], always=True,
    ),
    # -- further mistakes --------------------------------------------------------------------------
    Mutant(
        name="ties_by_concatenation",
        why="Ties compared on the merged token a + b instead of the pair (a, b): (b'B', b'ZZ') then "
            "beats (b'BA', b'A').",
        patches=[(
            "best = max(pair for pair, count in pair_counts.items() if count == top)",
            "best = max((pair for pair, count in pair_counts.items() if count == top), key=lambda p: (p[0] + p[1], p))",
        )],
        loses=["test_train_ties"],
    ),
    Mutant(
        name="special_tokens_not_longest_first",
        why="Special tokens tried in the order given instead of longest first, so '<|end|>' wins over "
            "'<|end|><|end|>'.",
        patches=[(
            "alternatives = sorted(set(special_tokens), key=len, reverse=True)",
            "alternatives = list(dict.fromkeys(special_tokens))",
        )],
        loses=["test_special_tokens_encode", "test_train_special_tokens"],
    ),
    Mutant(
        name="duplicate_specials_kept",
        why="Duplicate special tokens are not dropped, so each copy takes an id (and a merge less).",
        patches=[(
            "specials = list(dict.fromkeys(special_tokens))  # duplicates dropped, first occurrence kept",
            "specials = list(special_tokens)",
        )],
        loses=["test_train_vocab_layout", "test_train_special_tokens"],
    ),
    Mutant(
        name="no_value_error",
        why="A vocab_size too small for the bytes and special tokens is not rejected.",
        patches=[(
            "    if vocab_size < 256 + len(specials):\n        raise ValueError(",
            "    if False:\n        raise ValueError(",
        )],
        loses=["test_train_vocab_size_too_small"],
    ),
    Mutant(
        name="ids_are_bytes",
        why="encode assumes that the single byte b has id b, which is true of the vocabularies "
            "train_bpe makes but not of GPT-2's.",
        patches=[(
            "ids = [self.token_to_id[token] for token in tokens]",
            "ids = [token[0] if len(token) == 1 else self.token_to_id[token] for token in tokens]",
        )],
        loses=["test_gpt2_encode_matches_tokenizers", "test_encode_applies_merges_by_rank"],
    ),
    Mutant(
        name="save_loses_special_tokens",
        why="save writes the vocabulary and merges but not the special tokens, so the loaded tokenizer "
            "spells '<|endoftext|>' out as text.",
        patches=[('"special_tokens": self.special_tokens,', '"special_tokens": [],')],
        loses=["test_save_load_roundtrip"],
    ),
    Mutant(
        name="to_hf_prefix_space",
        why="to_hf configures the byte-level pre-tokenizer with a prefix space (the tokenizers default "
            "for some models), so the first word is encoded as if preceded by a space.",
        patches=[(
            "tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)",
            "tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)",
        )],
        loses=["test_to_hf_matches_encode"],
    ),
    Mutant(
        name="ratio_in_characters",
        why="The compression ratio counts characters instead of UTF-8 bytes.",
        patches=[("return len(text.encode(\"utf-8\")) / len(tokenizer.encode(text))",
                  "return len(text) / len(tokenizer.encode(text))")],
        loses=["test_compression_ratio"],
    ),
    Mutant(
        name="cost_per_thousand",
        why="The price is applied per thousand tokens instead of per million.",
        patches=[("return len(tokenizer.encode(text)) * usd_per_million_tokens / 1_000_000",
                  "return len(tokenizer.encode(text)) * usd_per_million_tokens / 1_000")],
        loses=["test_estimate_token_cost"],
    ),
]
