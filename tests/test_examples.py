"""The quick start's examples grade as the README says: the reference full marks,
the untouched stub 0, the partly wrong attempt in between."""
from pathlib import Path

from coursekit.batch import discover, grade_batch
from coursekit.config import load_course

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_examples(tmp_path):
    course = load_course(ROOT / "course.yaml")
    rows = grade_batch(course, discover(course, [ROOT / "examples" / "01_attention"], None),
                       tmp_path, workers=2, progress=False)
    scores = {row["student"]: float(row["score"]) for row in rows}
    assert all(row["lab"] == "01_attention" and not row["problem"] for row in rows), rows
    assert scores["reference"] == 100 and scores["stub"] == 0
    assert 0 < scores["partly_wrong"] < 100
