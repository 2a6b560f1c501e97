#!/usr/bin/env bash
# Grade every lab's reference (its source notebook) and stub (its release notebook) on this
# machine's GPU, in an environment like the NGC PyTorch container's, and write a summary.
#
#   scripts/gpu_check.sh WHEELS OUT [LAB...]
#
# WHEELS  a folder of wheels (scripts/gpu-requirements.txt lists them; the README shows the download
#         command; builds for several Pythons may sit side by side). Only those that fit this Python
#         and whose distribution it lacks are installed, into a scratch environment that sees the machine's own packages: the
#         machine's torch is never touched.
# OUT     the summary (summary.tsv, summary.json), each lab's results and logs.
# LAB     the labs to grade (default: every lab in course.yaml).
#
# Environment: DEVICE (cuda, the default, or cpu for a dry run on a machine without a GPU);
# PYTHON (python3); PREFIX, the scratch environment (/opt/course-gpu-env: outside /tmp, which the
# student's sandbox covers, and readable by the unprivileged student user); WORKERS (2);
# SKIP, space-separated LAB:TEST pairs not to run (e.g. a test whose model weights are not here).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
WHEELS=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/course-gpu-env}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-2}
SKIP=${SKIP:-}
say() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*"; }

# 1. A scratch environment on top of the machine's Python: its own site-packages first, then the
#    machine's (processed as site dirs, so their .pth files apply), then this repository.
if [ ! -x "$PREFIX/bin/python" ]; then
  say "creating $PREFIX on $($PYTHON -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PYTHON" -m venv --without-pip "$PREFIX"
fi
VPY=$PREFIX/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" - "$SITE/00-machine-site.pth" <<'EOF'
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as handle:
    handle.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
EOF
echo "$ROOT" > "$SITE/course-repository.pth"

# 2. The wheels this Python lacks, and no others.
# The folder may hold builds for several Pythons: only wheels this interpreter can install count.
MISSING=$("$VPY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
supported, chosen = set(sys_tags()), {}
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, _, _, tags = parse_wheel_filename(wheel.name)
    if tags & supported:
        chosen.setdefault(name, wheel)
for name, wheel in chosen.items():
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
if [ -n "$MISSING" ]; then
  say "installing $(echo "$MISSING" | wc -l) wheel(s) into $PREFIX"
  # shellcheck disable=SC2086  (one wheel path per line, no spaces in wheel names)
  "$VPY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check $MISSING
fi
"$VPY" - "$DEVICE" <<'EOF'
import sys
import torch, transformers, jupyter_client, ipykernel, nbformat, coursekit  # noqa: F401  all must import
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: DEVICE=cuda but torch sees no GPU (set DEVICE=cpu for a dry run)")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"device: {torch.cuda.get_device_name() if sys.argv[1] == 'cuda' else 'cpu'}")
EOF

# 3. Every lab's reference and stub, one `course grade` per lab.
LABS=("$@")
if [ ${#LABS[@]} -eq 0 ]; then
  mapfile -t LABS < <("$VPY" -c 'from coursekit.config import load_course; print(*load_course().labs, sep="\n")')
fi
mkdir -p "$OUT/logs"
for lab in "${LABS[@]}"; do
  only=$("$VPY" - "$lab" "$SKIP" <<'EOF'
import sys
from coursekit.config import load_course
lab, skip = load_course().lab(sys.argv[1]), set(sys.argv[2].split())
if any(pair.startswith(lab.id + ":") for pair in skip):
    print(" ".join(f"--only {t}" for t in lab.tests if f"{lab.id}:{t}" not in skip))
EOF
)
  notebook=$("$VPY" -c "from coursekit.config import load_course; print(load_course().lab('$lab').notebook)")
  staged="$OUT/submissions/$lab"
  mkdir -p "$staged"
  cp "$ROOT/source/$lab/$notebook" "$staged/reference.ipynb"
  cp "$ROOT/release/$lab/$notebook" "$staged/stub.ipynb"
  say "grading $lab on $DEVICE${only:+ (skipping: $(echo "$SKIP" | tr ' ' '\n' | grep "^$lab:" | cut -d: -f2 | tr '\n' ' '))}"
  # shellcheck disable=SC2086
  if ! (cd "$ROOT" && "$VPY" -m coursekit.cli grade "$staged" --lab "$lab" --out "$OUT/grading/$lab" \
        --device "$DEVICE" --workers "$WORKERS" --force $only) > "$OUT/logs/$lab.log" 2>&1; then
    say "$lab: course grade failed (see logs/$lab.log)"
  fi
  tail -n 4 "$OUT/logs/$lab.log" | head -n 2 | sed 's/^/    /'
done

# 4. The summary: one row per submission.
"$VPY" - "$OUT" "${LABS[@]}" <<'EOF'
import json, pathlib, sys
out, labs = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = []
for lab in labs:
    for name in ("reference", "stub"):
        path = out / "grading" / lab / name / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            rows.append({"lab": lab, "submission": name, "problem": f"no results ({path})"})
            continue
        extra, env = results["extra_data"], results["extra_data"].get("environment", {})
        ran = set(extra.get("only_tests") or [t["name"] for t in results["tests"]])
        rows.append({"lab": lab, "submission": name, "score": results["score"], "max_score": extra["max_score"],
                     "seconds": results["execution_time"], "device": env.get("device"),
                     "device_name": env.get("device_name"), "torch": env.get("torch"), "cuda": env.get("cuda"),
                     "grader_tf32": env.get("grader_tf32"), "student_tf32": env.get("student_tf32"),
                     "only_tests": extra.get("only_tests", "all"), "problem": extra.get("problem", ""),
                     "failed": [t["name"] for t in results["tests"] if t["name"] in ran and t["score"] < t["max_score"]]})
(out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
columns = ["lab", "submission", "score", "max_score", "seconds", "device_name", "torch", "cuda",
           "grader_tf32", "student_tf32", "problem"]
lines = ["\t".join(columns)] + ["\t".join(json.dumps(r.get(c, "")) if isinstance(r.get(c), dict) else str(r.get(c, ""))
                                          for c in columns) for r in rows]
(out / "summary.tsv").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
# A test left out with SKIP scores 0 on both: the reference must pass every test that ran.
bad = [r for r in rows if r.get("problem") or "score" not in r or (r["submission"] == "reference" and r["failed"])
       or (r["submission"] == "stub" and r["score"] != 0)]
for r in bad:
    print(f"NOT AS EXPECTED: {r['lab']} {r['submission']}: score {r.get('score')} {r.get('problem', '')} "
          f"{'failed: ' + ', '.join(r['failed'][:20]) if r['submission'] == 'reference' and r.get('failed') else ''}")
sys.exit(1 if bad else 0)
EOF
