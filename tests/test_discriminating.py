"""Each lab's hidden suite tells right from plausibly wrong: its reference keeps
full marks, its release stub scores 0 without breaking the grader, and every mutant in
tests/mutants/<lab>.py loses points on each test it names (graded on those tests alone). Every notebook goes through the real engine (worker process,
kernel, proxy), all of one lab's in one batch."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import nbformat
import pytest

from coursekit.batch import Submission, grade_batch
from coursekit.config import load_course
from coursekit.results import RESULTS_FILE, read_results

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
REFERENCE = "reference"
STUB = "release-stub"


# The wrong implementations each lab's issue names. They always run; the other
# mutants in tests/mutants/ run with COURSE_ALL_MUTANTS=1 (about twice the time:
# every mutant is a full grading, and CI has two cores).
ISSUE_MUTANTS = {
    "01_attention": ["scaled_by_d_model", "softmax_wrong_dim", "inverted_mask", "mask_after_softmax",
                     "heads_split_wrong_order", "no_max_subtraction"],
    "02_transformer_block": ["pre_ln_residual_adds_normalised_input", "pre_and_post_ln_swapped",
                             "final_pre_ln_norm_missing"],
    "03_positional_encoding": ["sin_cos_concatenated", "sinusoidal_exponent_i", "rope_half_split_pairs_adjacent",
                               "rope_ignores_positions", "rope_off_by_one", "alibi_naive_slopes", "alibi_wrong_sign"],
    "04_bpe_tokenizer": ["ties_first_occurrence", "ties_smallest_pair", "overlapping_pairs_counted_once",
                         "overlapping_merge", "merges_cross_pretokens", "special_tokens_trained_on",
                         "encode_by_frequency", "decode_token_by_token", "regex_without_contractions",
                         "recount_every_merge", "special_token_uses_byte_id"],
    "05_bert_finetuning": ["mean_pool_over_padding", "cls_wrong_index", "train_forgets_model_train",
                           "evaluate_forgets_model_eval", "no_zero_grad", "scheduler_per_epoch",
                           "f1_of_negative_class", "confusion_matrix_transposed"],
    "06_gpt_decoding": ["top_p_drops_crossing_token", "top_p_keeps_tail", "top_k_ties_by_index",
                        "temperature_after_filters", "beam_sums_raw_logits", "beam_no_length_normalisation",
                        "beam_counts_prompt_in_length", "beam_identical_beams", "greedy_ignores_eos"],
}
ALL_MUTANTS = os.environ.get("COURSE_ALL_MUTANTS") == "1"


def _all_mutants(lab_id: str) -> list:
    try:
        return importlib.import_module(f"tests.mutants.{lab_id}").MUTANTS
    except ModuleNotFoundError:
        return []


def _mutants(lab_id: str) -> list:
    mutants = _all_mutants(lab_id)
    return mutants if ALL_MUTANTS else [m for m in mutants if m.name in ISSUE_MUTANTS.get(lab_id, ())]


CASES = [(lab_id, mutant) for lab_id in COURSE.labs for mutant in _mutants(lab_id)]
LABS = list(COURSE.labs)


@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """Grade a lab's reference and mutants once, on first use."""
    cache: dict[str, dict[str, dict]] = {}

    def grade(lab_id: str) -> dict[str, dict]:
        if lab_id not in cache:
            lab = COURSE.lab(lab_id)
            folder = tmp_path_factory.mktemp(f"mutants-{lab_id}")
            source = nbformat.read(lab.notebook_in("source"), as_version=4)
            subs = [Submission(REFERENCE, lab.notebook_in("source"), lab),
                    Submission(STUB, lab.notebook_in("release"), lab)]
            for mutant in _mutants(lab_id):
                path = folder / f"{mutant.name}.ipynb"
                nbformat.write(mutant.apply(source), path)
                # Only the tests the mutant names: what it must lose is all this grading proves,
                # and a full grading per mutant would cost CI minutes per lab.
                subs.append(Submission(mutant.name, path, lab, only=tuple(mutant.loses)))
            out = folder / "out"
            grade_batch(COURSE, subs, out, workers=2, progress=False)
            cache[lab_id] = {s.name: read_results(out / s.name / RESULTS_FILE) for s in subs}
        return cache[lab_id]

    return grade


@pytest.mark.parametrize("lab_id", LABS)
def test_release_stub_scores_zero(graded, lab_id):
    results = graded(lab_id)[STUB]
    assert results["extra_data"]["problem"] == "", results["extra_data"]["problem"]
    assert results["score"] == 0, {t["name"]: t["score"] for t in results["tests"] if t["score"]}
    assert len(results["tests"]) == len(COURSE.lab(lab_id).tests)


@pytest.mark.parametrize("lab_id", LABS)
def test_the_issues_mutants_are_defined(lab_id):
    names = {m.name for m in _all_mutants(lab_id)}
    missing = [name for name in ISSUE_MUTANTS[lab_id] if name not in names]
    assert not missing, f"tests/mutants/{lab_id}.py lacks {missing}"


@pytest.mark.parametrize("lab_id", LABS)
def test_reference_keeps_full_marks(graded, lab_id):
    results = graded(lab_id)[REFERENCE]
    failing = {t["name"]: t["output"] for t in results["tests"] if t["score"] != t["max_score"]}
    assert not failing, f"the reference loses points: {failing}"
    assert results["score"] == COURSE.lab(lab_id).max_score


@pytest.mark.parametrize("lab_id,mutant", CASES, ids=[f"{lab}-{m.name}" for lab, m in CASES])
def test_mutant_loses_points(graded, lab_id, mutant):
    results = graded(lab_id)[mutant.name]
    assert mutant.loses, f"{mutant.name} names no test that should catch it"
    assert results["extra_data"]["problem"] == "", f"grading the mutant failed: {results['extra_data']['problem']}"
    assert results["extra_data"]["only_tests"] == sorted(mutant.loses)
    by_name = {t["name"]: t for t in results["tests"]}
    for name in mutant.loses:
        assert name in by_name, f"{mutant.name}: no test named {name} in course.yaml"
        # A test that did not run would lose its points for nothing: it must have run and failed.
        assert "This test did not run." not in by_name[name]["output"], f"{mutant.name}: {name} did not run"
        assert by_name[name]["score"] < by_name[name]["max_score"], (
            f"{mutant.name} ({mutant.why}) keeps full marks on {name}")
