"""course.yaml is validated on load, and each error names the key at fault."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from coursekit.config import ConfigError, load_course

ROOT = Path(__file__).resolve().parent.parent


def test_the_course_file_loads_and_lists_every_lab():
    course = load_course(ROOT / "course.yaml")
    assert list(course.labs) == ["01_attention", "02_transformer_block", "03_positional_encoding",
                                 "04_bpe_tokenizer", "05_bert_finetuning", "06_gpt_decoding",
                                 "07_gpt_from_scratch", "08_llama_lora", "09_alignment", "10_seq2seq_transformer"]
    assert course.device in ("cpu", "cuda", "auto")
    for lab in course.labs.values():
        assert lab.limits.test_seconds > 0 and lab.max_score > 0, lab.id
        assert lab.notebook_in("source").exists(), lab.id


def _write(tmp_path, data) -> Path:
    path = tmp_path / "course.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _valid():
    return {"course_id": "c", "title": "C", "image": {"base": "img"}, "device": "cpu",
            "defaults": {"limits": {"test_seconds": 10, "submission_seconds": 100, "memory_mb": 1000,
                                    "processes": 64}},
            "labs": [{"id": "l1", "title": "L", "notebook": "l.ipynb", "tests": {"test_a": 2,
                      "test_b": {"points": 3, "visibility": "hidden", "timeout": 30}}}]}


def test_a_valid_file_gives_points_limits_and_visibility(tmp_path):
    course = load_course(_write(tmp_path, _valid()))
    lab = course.lab("l1")
    assert lab.max_score == 5 and lab.tests["test_b"].timeout == 30
    assert lab.tests["test_a"].visibility == "visible" and lab.tests["test_b"].visibility == "hidden"
    assert lab.limits.memory_mb == 1000 and lab.preload == ()
    assert course.sandbox is True and course.student_user == "nobody"   # the defaults


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(device="tpu"), "device: expected one of cpu, cuda, auto, got 'tpu'"),
    (lambda d: d["labs"][0]["tests"].update(test_a="many"), "labs[0].tests.test_a: expected a number >= 0"),
    (lambda d: d["labs"][0]["tests"]["test_b"].update(visibility="secret"), "labs[0].tests.test_b.visibility"),
    (lambda d: d["labs"][0].update(notebook="lab.py"), "labs[0].notebook: expected a .ipynb file name"),
    (lambda d: d["defaults"]["limits"].pop("memory_mb"), "defaults.limits.memory_mb: expected a positive number"),
    (lambda d: d["labs"].append(dict(d["labs"][0])), "labs[1].id: 'l1' is used twice"),
    (lambda d: d["labs"][0].update(points=3), "labs[0]: unknown key 'points'"),
    (lambda d: d.update(labs=[]), "labs: expected a non-empty list"),
    (lambda d: d["defaults"]["limits"].update(cpus=0), "defaults.limits.cpus: expected a positive number"),
    (lambda d: d["labs"][0].update(limits={"gpus": -1}), "labs[0].limits.gpus: expected a number >= 0"),
    (lambda d: d["image"].update(grader=""), "image.grader: expected a non-empty string"),
    (lambda d: d.update(sandbox={"enabled": "no"}), "sandbox.enabled: expected true or false, got 'no'"),
    (lambda d: d.update(sandbox={"student_user": ""}), "sandbox.student_user: expected a non-empty string"),
    (lambda d: d.update(sandbox={"user": "x"}), "sandbox: unknown key 'user'"),
    # Late work: a policy needs a due date; penalties are percentages; the cutoff comes after the due date.
    (lambda d: d["labs"][0].update(late={"percent_per_day": 10}), "labs[0].late: a late policy needs the lab's due date"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={"percent_per_day": -5}),
     "labs[0].late.percent_per_day: expected a number >= 0, got -5"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={"percent_per_day": 10, "max_percent": 150}),
     "labs[0].late.max_percent: expected a percentage of the score, 0 to 100, got 150"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={"cutoff": "2025-12-31T12:00:00Z"}),
     "labs[0].late.cutoff: 2025-12-31T12:00:00+00:00 is not after the lab's due date"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={"cutoff": "next week"}),
     "labs[0].late.cutoff: expected a date and time"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={"per_day": 10}), "labs[0].late: unknown key 'per_day'"),
    (lambda d: d["labs"][0].update(due="2026-01-01T12:00:00Z", late={}), "labs[0].late: expected percent_per_day"),
    (lambda d: d.update(extensions={"alice": {"l2": 2}}), "extensions.alice.l2: no such lab; the labs are: l1"),
    (lambda d: d.update(extensions={"alice": {"l1": 2}}), "extensions.alice.l1: lab l1 has no due date to extend"),
    (lambda d: (d["labs"][0].update(due="2026-01-01T12:00:00Z"), d.update(extensions={"alice": {"l1": -1}})),
     "extensions.alice.l1: expected a positive number, got -1"),
    (lambda d: d["labs"][0]["tests"]["test_b"].update(public="yes"),
     "labs[0].tests.test_b.public: expected true or false"),
    (lambda d: d["labs"][0]["tests"]["test_b"].update(public=True),
     "labs[0].tests.test_b: a public test cannot have visibility 'hidden'"),
    (lambda d: d["labs"][0].update(preload="sympy"), "labs[0].preload: expected a list of module names"),
    (lambda d: d["labs"][0].update(preload=["torch.fx..experimental"]), "labs[0].preload: expected a list of module names"),
])
def test_errors_name_the_key(tmp_path, edit, message):
    data = _valid()
    edit(data)
    with pytest.raises(ConfigError) as error:
        load_course(_write(tmp_path, data))
    assert message in str(error.value)


def test_a_late_policy_and_extensions_are_read(tmp_path):
    data = _valid()
    data["labs"][0].update(due="2026-01-01T12:00:00Z", late={"percent_per_day": 10, "cutoff": "2026-01-08"})
    data["extensions"] = {"alice": {"l1": 2}, 1234: {"l1": 0.5}}
    lab = load_course(_write(tmp_path, data)).lab("l1")
    assert (lab.late.percent_per_day, lab.late.max_percent) == (10, 100)   # no cap: up to all of the score
    assert lab.late.cutoff.isoformat() == "2026-01-08T23:59:59+00:00"     # a date alone: the end of that day
    assert lab.extensions == {"alice": 2, "1234": 0.5}                     # numeric student ids as text


def test_a_test_marked_public_is_listed_and_leaves_submission_keys_alone(tmp_path):
    from coursekit.keys import submission_key

    data = _valid()
    plain = load_course(_write(tmp_path, data)).lab("l1")
    data["labs"][0]["tests"]["test_a"] = {"points": 2, "public": True}
    lab = load_course(_write(tmp_path, data)).lab("l1")
    assert lab.public_tests == ["test_a"] and plain.public_tests == []
    # Who may run a test beforehand changes no grade: nothing graded before is regraded.
    notebook = tmp_path / "l.ipynb"
    notebook.write_text("{}")
    assert submission_key(lab, notebook) == submission_key(plain, notebook)


def test_resources_and_grader_image_have_defaults(tmp_path):
    course = load_course(_write(tmp_path, _valid()))
    assert (course.lab("l1").limits.cpus, course.lab("l1").limits.gpus) == (1, 0)
    assert course.image_grader == "nlp-course/grader"
    data = _valid()
    data.update(device="cuda", image={"base": "img", "grader": "me/grader:2"})
    data["labs"][0]["limits"] = {"cpus": 2.5}
    course = load_course(_write(tmp_path, data))
    # Grading on CUDA asks for a GPU per submission; a lab's cpus overrides the default.
    assert (course.lab("l1").limits.cpus, course.lab("l1").limits.gpus) == (2.5, 1)
    assert course.image_grader == "me/grader:2"
    data["defaults"]["limits"]["gpus"] = 0.5  # Ray shares a GPU between tasks by fractions
    assert load_course(_write(tmp_path, data)).lab("l1").limits.gpus == 0.5


def test_unknown_lab_lists_the_known_ones(tmp_path):
    course = load_course(_write(tmp_path, _valid()))
    with pytest.raises(ConfigError, match="the labs are: l1"):
        course.lab("l9")


def test_not_yaml_is_reported(tmp_path):
    path = tmp_path / "course.yaml"
    path.write_text("labs: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_course(path)


def _timed(tmp_path, data, timings):
    suite = tmp_path / "autograder" / "l1"
    suite.mkdir(parents=True)
    (suite / "reference-timings.json").write_text(json.dumps(timings))
    return load_course(_write(tmp_path, data)).lab("l1")


def test_limits_derive_from_what_the_reference_needs(tmp_path):
    lab = _timed(tmp_path, _valid(), {"slowest_cell_seconds": 2.34, "tests": {"test_a": 0.2, "test_b": 4.01}})
    # 20x the reference, at least 30 s, rounded up to 10 s; an explicit timeout wins.
    assert lab.limits.cell_seconds == 50 and lab.limits.reference_cell_seconds == 2.34
    assert lab.tests["test_a"].timeout == 30 and lab.tests["test_a"].reference_seconds == 0.2
    assert lab.tests["test_b"].timeout == 30 and lab.tests["test_b"].reference_seconds == 4.01


def test_a_lab_that_sets_its_limits_keeps_them(tmp_path):
    data = _valid()
    data["labs"][0]["limits"] = {"cell_seconds": 7, "test_seconds": 9}
    lab = _timed(tmp_path, data, {"slowest_cell_seconds": 100.0, "tests": {"test_a": 100.0}})
    assert lab.limits.cell_seconds == 7 and lab.tests["test_a"].timeout is None
    assert lab.limits.test_seconds == 9 and lab.tests["test_a"].reference_seconds == 100.0


def test_a_broken_timings_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="reference-timings.json.*course check"):
        _timed(tmp_path, _valid(), {"tests": []})
