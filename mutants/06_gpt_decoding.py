"""Plausible wrong implementations of lab 06 (decoding strategies).

The first nine (always=True) are graded on every test run; the others are further mistakes students make,
each aimed at one part of the contract so that every hidden test is shown to have teeth.
"""
from mutants.mutation import Mutant

BEAM_TESTS = ["test_beam_search_gpt2", "test_beam_search_length_normalisation", "test_beam_search_early_eos"]

MUTANTS = [
    # -- always graded ------------------------------------------------------------------------------
    Mutant(
        name="top_p_drops_crossing_token",
        why="Top-p keeps only the tokens whose cumulative probability stays within p, dropping the token "
            "that crosses the threshold (the set then no longer reaches p).",
        patches=[("remove_sorted = mass_before >= p", "remove_sorted = probs.cumsum(dim=-1) > p")],
        loses=["test_top_p_filter", "test_top_p_extremes", "test_sample_support", "test_sample_frequencies"], always=True,
    ),
    Mutant(
        name="top_p_keeps_tail",
        why="Top-p sorts the probabilities in increasing order, so it keeps the least likely tokens (the "
            "tail) instead of the most likely ones (the head).",
        patches=[("torch.sort(logits, dim=-1, descending=True)", "torch.sort(logits, dim=-1, descending=False)")],
        loses=["test_top_p_filter", "test_top_p_extremes", "test_sample_support", "test_sample_frequencies"], always=True,
    ),
    Mutant(
        name="top_k_ties_by_index",
        why="Top-k keeps exactly the k indices torch.topk returns, so among tokens tied with the k-th "
            "value only some survive (chosen by index), where transformers keeps them all.",
        patches=[(
            'kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]\n'
            '    return logits.masked_fill(logits < kth_value, float("-inf"))',
            'keep = torch.topk(logits, k, dim=-1).indices\n'
            '    remove = torch.ones_like(logits, dtype=torch.bool).scatter(-1, keep, False)\n'
            '    return logits.masked_fill(remove, float("-inf"))',
        )],
        loses=["test_top_k_ties"], always=True,
    ),
    Mutant(
        name="temperature_after_filters",
        why="sample_next_token applies top-k and top-p to the raw logits and divides by the temperature "
            "only before the softmax: the nucleus is then computed on the wrong distribution.",
        patches=[
            ("logits = apply_temperature(logits, temperature)\n    if top_k:", "if top_k:"),
            ("probs = logits.softmax(dim=-1)\n    draws",
             "probs = apply_temperature(logits, temperature).softmax(dim=-1)\n    draws"),
        ],
        loses=["test_sample_support", "test_sample_frequencies"], always=True,
    ),
    Mutant(
        name="beam_sums_raw_logits",
        why="Beam search adds up raw logits instead of log-probabilities: logits of different beams are "
            "on different scales, so the ranking across beams and the scores are wrong.",
        patches=[(
            "log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)",
            "log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32))",
        )],
        loses=BEAM_TESTS, always=True,
    ),
    Mutant(
        name="beam_no_length_normalisation",
        why="Finished hypotheses are scored by their summed log-probability, ignoring length_penalty.",
        patches=[("finished.append((total / gen_len ** length_penalty, ids))", "finished.append((total, ids))")],
        loses=BEAM_TESTS, always=True,
    ),
    Mutant(
        name="beam_counts_prompt_in_length",
        why="The length penalty divides by the length of the whole sequence, prompt included, instead of "
            "the number of generated tokens.",
        patches=[("finished.append((total / gen_len ** length_penalty, ids))",
                  "finished.append((total / (gen_len + input_ids.shape[1]) ** length_penalty, ids))")],
        loses=BEAM_TESTS, always=True,
    ),
    Mutant(
        name="beam_identical_beams",
        why="The search starts from num_beams copies of the prompt, all with score 0, so the top "
            "candidates of the first step are the same continuation num_beams times: after the first step "
            "all beams are identical.",
        patches=[("beams = [(input_ids[0], 0.0)]  #", "beams = [(input_ids[0], 0.0)] * num_beams  #")],
        loses=["test_beam_search_gpt2", "test_beam_search_length_normalisation"], always=True,
    ),
    Mutant(
        name="greedy_ignores_eos",
        why="Greedy decoding does not stop after emitting the EOS token; it always runs to max_new_tokens.",
        patches=[("            if eos_token_id is not None and next_id.item() == eos_token_id:\n"
                  "                break", "            pass")],
        loses=["test_greedy_stops_at_eos", "test_greedy_plain_callable", "test_generate_dispatch"], always=True,
    ),
    # -- further mistakes ------------------------------------------------------------------------------
    Mutant(
        name="greedy_last_token_only",
        why="Greedy decoding feeds the model only the last token at each step (as if a KV cache were "
            "there), losing the context. A model that only looks at the last token does not notice.",
        patches=[("next_token_logits(model, ids).argmax(", "next_token_logits(model, ids[:, -1:]).argmax(")],
        loses=["test_greedy_matches_generate", "test_greedy_stops_at_eos"],
    ),
    Mutant(
        name="temperature_zero_accepted",
        why="A temperature of 0 is accepted (and divides by zero) instead of raising ValueError.",
        patches=[("or not temperature > 0:", "or not temperature >= 0:")],
        loses=["test_temperature_rejects_non_positive"],
    ),
    Mutant(
        name="top_k_zero_not_off",
        why="sample_next_token treats top_k=0 as a value to apply (top_k_filter then raises) instead of "
            "'no top-k'.",
        patches=[("if top_k:  # None and 0 both mean", "if top_k is not None:  # None and 0 both mean")],
        loses=["test_sample_support", "test_sample_frequencies"],
    ),
    Mutant(
        name="sample_ignores_generator",
        why="sample_next_token draws from the global random generator instead of the one passed in, so "
            "seeded draws are not reproducible.",
        patches=[("num_samples=1, generator=generator)", "num_samples=1)")],
        loses=["test_sample_frequencies"],
    ),
    Mutant(
        name="beam_keeps_low_ranked_eos",
        why="Every candidate that ends in EOS among the 2 * num_beams counts as finished, not only those "
            "ranked within the first num_beams.",
        patches=[("if rank < num_beams:  #", "if True:  #")],
        loses=["test_beam_search_early_eos"],
    ),
    Mutant(
        name="beam_no_early_stopping",
        why="The search goes on to max_new_tokens instead of stopping once num_beams hypotheses are "
            "finished (early_stopping=True).",
        patches=[("if len(finished) == num_beams or not running:", "if not running:")],
        loses=["test_beam_search_gpt2", "test_beam_search_early_eos"],
    ),
    Mutant(
        name="generate_wrong_default_beams",
        why="generate(strategy='beam') defaults to 2 beams instead of 4.",
        patches=[('kwargs.pop("num_beams", 4)', 'kwargs.pop("num_beams", 2)')],
        loses=["test_generate_dispatch"],
    ),
]
