#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with the project (editable,
# compiled kernels built in place), its dependencies and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip setuptools wheel "Cython>=3.0" numpy
# torch and torchvision from the registry, together (matching builds; they run on the CPU too).
python -m pip install --quiet torch torchvision
python -m pip install --quiet -e ".[test]"
# The reference ASMK implementation, for parity tests and benchmarks. It declares faiss-cpu, which
# would silently replace the faiss module of faiss-gpu, so it is installed without dependencies
# (its other needs, numpy and pyaml, come with the test extra; Cython builds it here).
python -m pip install --quiet --no-deps --no-build-isolation asmk==0.1.1
python scripts/check_environment.py
