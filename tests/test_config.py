"""course.yaml is validated on load, and each error names the key at fault."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coursekit.config import ConfigError, load_course

ROOT = Path(__file__).resolve().parent.parent


def test_the_course_file_loads_and_lists_every_lab():
    course = load_course(ROOT / "course.yaml")
    assert list(course.labs) == ["01_attention", "02_transformer_block", "03_positional_encoding",
                                 "04_bpe_tokenizer", "05_bert_finetuning", "06_gpt_decoding"]
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
    assert lab.limits.memory_mb == 1000


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
])
def test_errors_name_the_key(tmp_path, edit, message):
    data = _valid()
    edit(data)
    with pytest.raises(ConfigError) as error:
        load_course(_write(tmp_path, data))
    assert message in str(error.value)


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
