#!/usr/bin/env bash
# Builds bench/gpu-wheels/ (git-ignored): everything bench/bench_gpu_connector.py installs on a GPU
# machine that has torch but no registry access and none of kvtier's dependencies. Run it HERE, with
# PyPI reachable (`make gpu-wheels`), right before carrying the folder to the GPU machine: the kvtier
# wheel is a snapshot of this working tree (tracked and untracked, not ignored, files) at build time.
#
# Contents, one version of each distribution for every Python (manylinux2014 x86_64, CPython):
#   - kvtier-*.whl: this repo, with the gRPC code generated at build time (setup.py) by a grpcio-tools
#     no newer than the grpcio shipped, so the generated code's version check passes;
#   - kvtier's install_requires (pyproject.toml) and their dependencies, except numpy (three numpy
#     wheels alone would pass the 60 MiB budget; torch machines have it: the bench checks and says so);
# Never torch, vllm, sglang or nixl.
#
# Python 3.10 is left out: kvtier requires 3.11 (pyproject.toml; tomllib, asyncio.timeout,
# dataclass(weakref_slot) in the daemon), so 3.10 wheels could never be used.
# Knobs (environment): GPU_WHEELS_DIR (default bench/gpu-wheels), GPU_WHEELS_PYTHONS (default
# "3.11 3.12 3.13"), GPU_WHEELS_NUMPY=1 (add numpy: fits the budget for one or two Pythons only),
# PYTHON (the interpreter that builds, >= 3.11 with venv and pip; default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${GPU_WHEELS_DIR:-$ROOT/bench/gpu-wheels}
PYTHONS=${GPU_WHEELS_PYTHONS:-"3.11 3.12 3.13"}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
PLATFORM=manylinux2014_x86_64

tmp=$(mktemp -d /tmp/kvtier-gpu-wheels.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
say() { echo "[gpu-wheels] $*" >&2; }

# A throwaway venv for pip (downloads) and the wheel build (setuptools, wheel, grpcio-tools).
"$PYTHON" -m venv "$tmp/venv"
VPY=$tmp/venv/bin/python
"$VPY" -m pip install -q --upgrade pip

# install_requires from pyproject.toml, numpy left out unless asked for.
"$VPY" - "$ROOT/pyproject.toml" "${GPU_WHEELS_NUMPY:-0}" >"$tmp/requirements.txt" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in deps:
    name = dep.split(">")[0].split("=")[0].split("<")[0].split("~")[0].split("[")[0].strip().lower()
    if name == "numpy" and sys.argv[2] != "1":
        continue
    print(dep)
EOF
say "requirements: $(tr '\n' ' ' <"$tmp/requirements.txt")"

download() {  # download <python version> <dir> [pip args...]
    local version=$1 dir=$2
    shift 2
    "$VPY" -m pip download -q --only-binary=:all: --platform "$PLATFORM" --python-version "$version" \
        --implementation cp -d "$dir" "$@"
}

# The first Python decides the versions (the newest that have wheels for it); the others get the same.
first=${PYTHONS%% *}
mkdir -p "$tmp/dl/$first"
download "$first" "$tmp/dl/$first" -r "$tmp/requirements.txt"
"$VPY" - "$tmp/dl/$first" >"$tmp/pins.txt" <<'EOF'
import os, sys
for name in sorted(os.listdir(sys.argv[1])):
    if name.endswith(".whl"):
        dist, version = name.split("-")[:2]
        print(f"{dist.replace('_', '-')}=={version}")
EOF
for version in $PYTHONS; do
    [ "$version" = "$first" ] && continue
    mkdir -p "$tmp/dl/$version"
    download "$version" "$tmp/dl/$version" -r "$tmp/requirements.txt" -c "$tmp/pins.txt"
done

# The kvtier wheel, built from a copy of the working tree: setup.py writes the generated gRPC code
# into proto/v1/, and the repo's own copies (used by editable installs) must stay as they are.
grpc=$(sed -n 's/^grpcio==//p' "$tmp/pins.txt")
[ -n "$grpc" ] || { say "no grpcio among the downloads"; exit 1; }
"$VPY" -m pip install -q "setuptools>=69" wheel "grpcio-tools<=$grpc"
mkdir -p "$tmp/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$ROOT" && xargs -0 -I{} sh -c '[ -f "{}" ] && printf "%s\0" "{}"' ) |
    (cd "$ROOT" && tar --null -T - -cf -) | (cd "$tmp/src" && tar -xf -)
"$VPY" -m pip wheel --no-deps --no-build-isolation -w "$tmp/kvtier" "$tmp/src" >"$tmp/build.log" 2>&1 ||
    { cat "$tmp/build.log" >&2; say "building the kvtier wheel failed"; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$tmp"/kvtier/kvtier-*.whl "$OUT"/
for dir in "$tmp"/dl/*; do cp -n "$dir"/*.whl "$OUT"/; done

# The generated gRPC code must be in the wheel.
"$VPY" - "$OUT" <<'EOF'
import glob, sys, zipfile
wheel, = glob.glob(f"{sys.argv[1]}/kvtier-*.whl")
names = set(zipfile.ZipFile(wheel).namelist())
need = ["kvtier/proto/v1/kvtier_pb2.py", "kvtier/proto/v1/kvtier_pb2_grpc.py", "kvtier/daemon/main.py",
        "kvtier/connectors/_pipeline.py", "kvtier/connectors/_transfers.py", "kvtier/connectors/_layout.py",
        "kvtier/connectors/_daemon.py", "kvtier/client/process.py"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"[gpu-wheels] {wheel} lacks {missing}")
EOF

tools=$("$VPY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "code: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(
        [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' + local changes')"
    echo "pythons: $PYTHONS (CPython, $PLATFORM)"
    echo "grpcio-tools (generated code): $tools"
    echo "numpy: $([ "${GPU_WHEELS_NUMPY:-0}" = 1 ] && echo shipped || echo 'from the machine')"
} >"$OUT/BUILD-INFO.txt"

size=$(du -sm "$OUT" | cut -f1)
bytes=$(du -sb "$OUT" | cut -f1)
ls -1 "$OUT"
say "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $((bytes / 1048576)) MiB ($bytes bytes)"
if [ "$bytes" -ge $((LIMIT_MIB * 1048576)) ]; then
    say "over the ${LIMIT_MIB} MiB budget"
    exit 1
fi
