"""How long `course similarity` takes on a class of synthetic lab-01 submissions.

    .venv/bin/python bench/similarity.py [--students 200] [--keep DIR] [--difflib-pairs 300]

Writes N notebooks (lab 01's release notebook, each stub answered with random code of a
real answer's size: assignments, torch calls, branches and loops over a dozen names and
random numbers) and a
results.json naming each one, as `course grade --out` would; every 40th student hands in the
previous one's code with every name changed. Then runs `course similarity` on them as a
command (imports included) and prints its wall and CPU time, and, for comparison, what difflib's
SequenceMatcher would take for all pairs (timed on a sample of pairs). Prints one
machine-readable line: `similarity students=N pairs=P seconds=S cpu_seconds=C difflib_seconds=D`.
"""
from __future__ import annotations

import argparse
import difflib
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402

from coursekit.config import load_course  # noqa: E402
from coursekit.results import Results, save_submission  # noqa: E402
from coursekit.similarity import graded_code  # noqa: E402

LAB = "01_attention"
STUB = "raise NotImplementedError()"
NAMES = ["scores", "mask", "weights", "out", "probs", "total", "heads", "x", "y", "shift", "scale", "keep"]
CALLS = ["softmax", "exp", "sum", "amax", "where", "matmul", "tril", "ones_like", "zeros_like", "isfinite"]


def random_body(rng: random.Random, names: list[str], indent: str, lines: int) -> str:
    """Code that only this student writes (the same seed with other names: a renamed copy)."""
    body = []
    for _ in range(lines):
        a, b, c = (names[rng.randrange(len(names))] for _ in range(3))
        kind = rng.randrange(5)
        n, m = rng.randint(0, 999), rng.randint(0, 999)
        if kind == 0:
            body.append(f"{a} = {b} {rng.choice('+-*/')} {c} {rng.choice('+-*/')} {n}")
        elif kind == 1:
            body.append(f"{a} = torch.{rng.choice(CALLS)}({b} * {n}, dim={rng.randint(-3, 2)}) + {m}")
        elif kind == 2:
            body.append(f"if {a}.{rng.choice(['dim()', 'numel()', 'ndim'])} > {n}:\n"
                        f"{indent}    {b} = {c}[..., {m}:]")
        elif kind == 3:
            body.append(f"for {a} in range({n}):\n{indent}    {b} = {b} * {c} - {m}")
        else:
            body.append(f"{a}, {b} = {b}.{rng.choice(['float', 'detach', 'clone', 'contiguous'])}() / {n}, {c}")
    return f"\n{indent}".join(body) + f"\n{indent}return {names[0]}"


def submission(release: nbformat.NotebookNode, seed: int, names: list[str]) -> nbformat.NotebookNode:
    rng = random.Random(seed)
    nb = nbformat.from_dict(release)
    for cell in nb.cells:
        while cell.cell_type == "code" and STUB in cell.source:
            indent = cell.source.split(STUB)[0].rsplit("\n", 1)[-1]
            cell.source = cell.source.replace(STUB, random_body(rng, names, indent, rng.randint(8, 16)), 1)
    return nb


def write_class(root: Path, students: int) -> Path:
    lab = load_course().lab(LAB)
    release = nbformat.read(lab.notebook_in("release"), as_version=4)
    out = root / "out"
    for i in range(students):
        copier = i % 40 == 39
        seed = i - 1 if copier else i
        names = [f"{n}_{i}" for n in NAMES] if copier else NAMES
        path = root / "submitted" / f"s{i:03d}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(submission(release, seed, names), path)
        save_submission(out / f"s{i:03d}", lab, Results(LAB, 0.0, lab.max_score, [],
                                                         extra={"student": f"s{i:03d}", "notebook": str(path)}))
    return out


def difflib_seconds(root: Path, sample: int) -> float:
    """All pairs' SequenceMatcher ratio on the graded code, extrapolated from `sample` pairs."""
    texts = [graded_code(nbformat.read(p, as_version=4)).text for p in sorted((root / "submitted").glob("*.ipynb"))]
    rng = random.Random(0)
    pairs = [tuple(rng.sample(range(len(texts)), 2)) for _ in range(sample)]
    began = time.perf_counter()
    for i, j in pairs:
        difflib.SequenceMatcher(None, texts[i], texts[j]).ratio()
    per_pair = (time.perf_counter() - began) / sample
    return per_pair * len(texts) * (len(texts) - 1) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="write the class here (default: a temporary folder)")
    parser.add_argument("--difflib-pairs", type=int, default=300, help="pairs timed for difflib (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        out = write_class(root, args.students)
        began, cpu_before = time.perf_counter(), _children_cpu()
        run = subprocess.run([sys.executable, "-m", "coursekit.cli", "similarity", str(out), "--lab", LAB],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        seconds, cpu = time.perf_counter() - began, _children_cpu() - cpu_before
        print("\n".join(run.stdout.splitlines()[:2] + ["  ..."] + run.stdout.splitlines()[-1:]))
        extra = difflib_seconds(root, args.difflib_pairs) if args.difflib_pairs else float("nan")
    pairs = args.students * (args.students - 1) // 2
    print(f"course similarity: {seconds:.1f} s ({cpu:.1f} s of CPU) for {args.students} notebooks ({pairs} pairs); "
          f"difflib's SequenceMatcher would take about {extra:.0f} s")
    print(f"similarity students={args.students} pairs={pairs} seconds={seconds:.2f} cpu_seconds={cpu:.2f} "
          f"difflib_seconds={extra:.1f}")
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
