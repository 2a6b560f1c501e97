"""The student's flow in a real browser, as the student image runs it: JupyterLab serving
a copy of release/ (the image serves release/ as /workspace, with the course's data two
folders above each notebook), lab 01's notebook opened, its cells run in order up to the
first task, a figure drawn in the output area, the notebook saved, then checked with
`course validate` as the student does before submitting.

    .venv/bin/python scripts/student_flow.py [--out DIR]

Lab 01 draws its figures with plot_attention, which the student writes in Task 5, so on
the stubs no figure cell of the notebook can run. After the cells before Task 1 (the
setup and the demos), the student adds a cell of their own, as one does to look at a
result: the softmax of three attention scores, computed in the cell itself (a variable of
a demo cell would not exist when the grader runs the notebook, as it skips demo cells).
At that point every task is still a stub, so `course validate` reports them (exit status 1):
the flow checks that it ran and read the notebook as lab 01's, not that the lab is done.

Screenshots (notebook-opened.png, plot.png) and the saved notebook land in --out (a new
temporary folder by default). Needs headless Chromium (tests/browser.py); without it the
script exits with status 2 and says what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from coursekit.notebook import task_heading
from tests.browser import LAPTOP, BrowserMissing, chromium, screenshot

LAB, NOTEBOOK = "01_attention", "attention.ipynb"
PLOT_CELL = ["scores = torch.tensor([2.0, 0.5, -1.0])",
             'plt.bar(["key 0", "key 1", "key 2"], torch.softmax(scores, dim=-1).tolist())',
             'plt.title("softmax of three attention scores")',
             "plt.show()"]
SERVER_SECONDS = 90     # JupyterLab's start on a busy 2-core machine
CELLS_SECONDS = 120     # the kernel's start (torch) and the cells before Task 1
STARTED = time.monotonic()


class FlowFailed(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:5.1f} s] {message}", file=sys.stderr, flush=True)


def student_workspace(tmp: Path) -> Path:
    """release/ as the student image lays it out: the notebooks' folder, and the course's data beside it."""
    course = tmp / "course"
    shutil.copytree(ROOT / "release" / LAB, course / "release" / LAB)
    (course / "data").symlink_to(ROOT / "data")
    return course / "release"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_jupyter_lab(workspace: Path, tmp: Path, port: int, token: str) -> subprocess.Popen:
    """The student image's command (docker/Dockerfile), on a free local port with a token,
    with its settings and state in `tmp` rather than the user's home."""
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about Jupyter news?" prompt over the screenshots.
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
           "IPYTHONDIR": str(tmp / "ipython")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
               f"--ServerApp.root_dir={workspace}", f"--IdentityProvider.token={token}"]
    log = open(tmp / "jupyter-lab.log", "wb")  # noqa: SIM115  (the server writes to it until it stops)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise FlowFailed(f"JupyterLab exited with status {server.returncode}; see {tmp / 'jupyter-lab.log'}")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise FlowFailed(f"JupyterLab did not answer within {SERVER_SECONDS} s; see {tmp / 'jupyter-lab.log'}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()   # the server shuts its kernels down on SIGTERM
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise FlowFailed(f"JupyterLab: {what} did not happen within {seconds:g} s")


def first_task_cell(notebook: Path) -> int:
    """The position (0-based) of the cell holding the notebook's first "## Task N:" heading."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return next(i for i, cell in enumerate(cells) if cell["cell_type"] == "markdown"
                and any(task_heading(line) for line in "".join(cell["source"]).splitlines()))


def run_flow(driver, url: str, notebook: Path, out: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def cells():
        return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook .jp-Cell")

    def status() -> str:
        return driver.execute_script("return document.querySelector('#jp-main-statusbar')?.innerText || ''")

    def keys(*sequence) -> None:
        chain = ActionChains(driver)
        for key in sequence:
            if key == "shift+enter":
                chain.key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT)
            elif key == "ctrl+s":
                chain.key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL)
            else:
                chain.send_keys(key)
        chain.perform()

    count = len(json.loads(notebook.read_text(encoding="utf-8"))["cells"])
    driver.get(url)
    wait_for(lambda: len(cells()) == count and "| Idle" in status(), CELLS_SECONDS, f"{notebook.name} opening, "
             "its kernel idle")
    say(f"{notebook.name} open in JupyterLab, its kernel idle")
    screenshot(driver, out / "notebook-opened.png")

    before_task = first_task_cell(notebook)
    cells()[0].click()
    keys(*["shift+enter"] * before_task)   # run each cell and move to the next, as a student does

    def ran() -> bool:
        prompts = [c.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text for c in cells()[:before_task]
                   if "jp-CodeCell" in c.get_attribute("class")]
        return all(p not in ("[ ]:", "[*]:") for p in prompts) and "| Idle" in status()
    wait_for(ran, CELLS_SECONDS, f"the {before_task} cells before the first task running")
    say(f"ran the {before_task} cells before the first task")

    keys("a", Keys.ENTER)     # a new cell above Task 1's heading, in edit mode
    for number, line in enumerate(PLOT_CELL):
        keys(*([Keys.ENTER] if number else []), line)
    keys("shift+enter")
    image = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), CELLS_SECONDS,
                     "the plot appearing")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    if not driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image):
        raise FlowFailed("the plot's image did not load")
    say("plot drawn in the output area")
    screenshot(driver, out / "plot.png")

    keys(Keys.ESCAPE, "ctrl+s")
    wait_for(lambda: "image/png" in notebook.read_text(encoding="utf-8"), 30, "the notebook saving with the plot")
    say(f"saved {notebook}")
    raised = [i + 1 for i, cell in enumerate(json.loads(notebook.read_text(encoding="utf-8"))["cells"][:before_task + 1])
              if any(output["output_type"] == "error" for output in cell.get("outputs", []))]
    if raised:
        raise FlowFailed(f"cells {raised} raised before the first task; see {notebook}")


def validate(notebook: Path) -> str:
    """`course validate` on the saved notebook in the student's folder: 0 (nothing to fix)
    and 1 (what it reports) are both a validation; anything else (it could not read the
    notebook or the course) fails the flow."""
    result = subprocess.run([sys.executable, "-m", "coursekit.cli", "validate", str(notebook)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    print(result.stdout, end="")
    if result.returncode not in (0, 1):
        raise FlowFailed(f"`course validate` could not check the saved notebook (status {result.returncode}): "
                         f"{result.stderr.strip()[-500:]}")
    say("course validate ran")
    return f"validated: `course validate` exited with status {result.returncode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the screenshots and the saved notebook go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="student-flow-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="student-flow-") as scratch:
        tmp = Path(scratch)
        workspace = student_workspace(tmp)
        port, token = free_port(), secrets.token_hex(16)
        try:
            with chromium(LAPTOP) as driver:
                server = start_jupyter_lab(workspace, tmp, port, token)
                say(f"JupyterLab answers on port {port}, serving {workspace}")
                try:
                    run_flow(driver, f"http://127.0.0.1:{port}/lab/tree/{LAB}/{NOTEBOOK}?token={token}",
                             workspace / LAB / NOTEBOOK, out)
                finally:
                    stop(server)
            print(validate(workspace / LAB / NOTEBOOK))
            saved = Path(shutil.copy(workspace / LAB / NOTEBOOK, out / NOTEBOOK))
            print(f"saved notebook: {saved}")
        except BrowserMissing as exc:
            print(f"student_flow: no headless Chromium: {exc}", file=sys.stderr)
            return 2
        except FlowFailed as exc:
            print(f"student_flow: {exc}", file=sys.stderr)
            return 1
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
