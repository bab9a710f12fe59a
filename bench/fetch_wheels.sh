#!/usr/bin/env bash
# The wheels of the serve extra and of the server tests' client that the GPU machine lacks (it has
# torch, triton, transformers, no index), for Python 3.12 x86_64, into .whl/ (git-ignored via
# .git/info/exclude; carried with `carry: [".whl"]`, installed by bench/gpu.sh). Run here, where
# the package registries are reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do plat+=(--platform "$p"); done
rm -f .whl/*.whl  # a package released since the last run would sit beside its old wheel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection \
  opentelemetry-api importlib-metadata zipp xgrammar openai jiter distro httpx2 httpcore2 truststore sniffio \
  jsonschema jsonschema-specifications referencing rpds-py
ls .whl | wc -l | xargs echo "wheels in .whl:"
