"""The quick start's examples grade as the README says: the reference full marks,
the untouched stub 0, the partly wrong attempt in between, and its feedback page
shows a student, in a real browser on a phone's screen, what failed."""
from pathlib import Path

import pytest

from coursekit.batch import discover, grade_batch
from coursekit.config import load_course
from coursekit.results import FEEDBACK_FILE, RESULTS_FILE, read_results
from tests.browser import PHONE, BrowserMissing, chromium, find_chromium, screenshot

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    course = load_course(ROOT / "course.yaml")
    out = tmp_path_factory.mktemp("examples")
    rows = grade_batch(course, discover(course, [ROOT / "examples" / "01_attention"], None),
                       out, workers=2, progress=False)
    return rows, out


def test_bundled_examples(graded):
    rows, _ = graded
    scores = {row["student"]: float(row["score"]) for row in rows}
    assert all(row["lab"] == "01_attention" and not row["problem"] for row in rows), rows
    assert scores["reference"] == 100 and scores["stub"] == 0
    assert 0 < scores["partly_wrong"] < 100


def test_partly_wrong_feedback_in_a_browser(graded, tmp_path):
    from selenium.webdriver.common.by import By

    try:
        find_chromium()
    except BrowserMissing as exc:
        pytest.skip(f"no headless Chromium: {exc}")
    _, out = graded
    results = read_results(out / "partly_wrong" / RESULTS_FILE)
    failed = next(t for t in results.tests if t.status == "failed")
    message = failed.output.splitlines()[1].split("] ", 1)[-1][:40]   # its first failed case, in words
    with chromium(PHONE, phone=True) as driver:
        driver.get((out / "partly_wrong" / FEEDBACK_FILE).as_uri())
        score = driver.find_element(By.ID, "score")
        assert score.is_displayed() and score.text.startswith(f"{results.score:g} / {results.max_score:g} points")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0], "wider than a phone"
        tasks = driver.find_element(By.ID, "tasks").text
        assert "✗ failed Task 2:" in tasks and "✓ passed Task 1:" in tasks
        screenshot(driver, tmp_path / "feedback-top.png")

        failure = driver.find_element(By.ID, f"test-{failed.name}")
        assert failure.is_displayed() and message in failure.text

        problem = driver.find_element(By.CSS_SELECTOR, "details.problem")
        traceback = problem.find_element(By.CSS_SELECTOR, "pre.traceback")
        summary = problem.find_element(By.TAG_NAME, "summary")
        assert summary.is_displayed() and "raised" in summary.text
        assert not traceback.is_displayed(), "the traceback should be folded until the student opens it"
        driver.execute_script("arguments[0].scrollIntoView()", summary)
        summary.click()
        assert traceback.is_displayed() and "Traceback (most recent call last)" in traceback.text
        screenshot(driver, tmp_path / "feedback-traceback.png")
