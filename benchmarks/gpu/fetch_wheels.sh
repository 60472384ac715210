#!/usr/bin/env bash
# Run HERE (not on the device): download the wheels the device machine lacks into .whl/ at the repo root (~20 MB).
# The device has torch (2.11 + CUDA 13 at last reading), transformers and accelerate but no diffusers, torchao or
# pydantic, and it cannot download. Versions are this project's locked ones (docker/requirements-py312.lock).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
# pydantic-core is the only one built per Python version, and the device's Python is not known in advance: take it
# for every version the project supports; session.sh lets pip pick the matching one.
for version in 3.11 3.12 3.13; do
  for p in diffusers==0.42.1 torchao==0.18.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
           typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==10.2.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
  done
done
ls -1 .whl
