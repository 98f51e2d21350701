#!/usr/bin/env bash
# `make gpu-kit`: the wheels a lent GPU machine lacks, in .whl/ (git-ignored), for bench/gpu_device.sh.
#
# For a GPU machine with PyTorch but without Ray, DeepSpeed or faiss, and without a package index
# (the H100/H200 lent to attrlab's sessions: Python 3.12, PyTorch 2.11, numpy, scipy, pandas,
# matplotlib, torchmetrics, safetensors, ...).
# `attrlab bench gpu` needs no Ray (the in-process loop), so the kit is DeepSpeed, its pure-Python
# needs, and faiss-cpu (coop_embed's / deml's validation search), at the versions of this venv:
# the device runs what the test suite ran here. DeepSpeed is published as a source archive only;
# it is built here into a py3-none-any wheel without its CUDA ops (DS_BUILD_OPS=0: the loop passes
# a torch optimiser, so no fused op is compiled). PYVER (default 3.12) picks the binary wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
OUT=.whl
[ -x "$PY" ] || { echo "gpu-kit: $PY not found: run 'make install' first" >&2; exit 2; }
version() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
pins=()  # deepspeed first: it is built from source below, the rest are downloaded as wheels
for p in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions faiss-cpu; do
  v=$(version "$p")
  [ -n "$v" ] || { echo "gpu-kit: $p is not installed in $PY's environment" >&2; exit 2; }
  pins+=("$p==$v")
done
rm -rf "$OUT" && mkdir -p "$OUT"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
# binary wheels for the device's interpreter (pip matches each manylinux tag exactly)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT" "${pins[@]:1}"
"$PY" -m pip download -q --no-deps --no-binary=deepspeed -d "$tmp" "${pins[0]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz
ls -1 "$OUT"
du -sh "$OUT" | awk '{print "gpu-kit: " $1 " in .whl/ (a device call carries at most 64 MiB with the tree)"}'
