#!/usr/bin/env bash
# Wheels the GPU box's image lacks (or holds at other versions), for its Python 3.12 x86-64:
# run here, on the CPU box, before the device call; the suite installs them there.
#
#   bash bench/gpu_wheels.sh        # -> .whl/ (git-ignored through .git/info/exclude)
#   then: device runs with carry [".whl"], "bash bench/gpu_suite.sh --part kernel", then --part service
#
# The versions are the ones installed here, the ones CI tests with. The generated gRPC
# stubs need grpcio >= their generator's version and a matching protobuf runtime, so both
# travel even though the image has a grpcio and a protobuf of its own. Everything else the
# suite imports (torch, triton, transformers, numpy, safetensors, prometheus-client, pytest)
# is in the image (.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
names=(grpcio protobuf grpcio-health-checking grpcio-reflection cachetools redis)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl
for name in "${names[@]}"; do
  version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$name==$version"
done
ls -l .whl
du -sh .whl
