#!/usr/bin/env bash
# Wheels the GPU benchmark box lacks (it has torch, transformers and triton but no package index):
# torchao for FP8, DeepSpeed and what it needs beyond that image, for Python 3.12 on x86-64.
# Run here, with pip and PyPI; carry the folder (about 8 MB) and install it there to /tmp/site:
#
#   bash benchmarks/gpu_wheels.sh .whl
#   # on the box:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" \
  torchao==0.17.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 hjson==3.1.0
# DeepSpeed ships as an sdist only; its wheel is pure Python (ops are JIT-built where they run).
python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w "$dest"
ls "$dest"
