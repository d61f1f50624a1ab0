#!/usr/bin/env bash
# Creates .venv with warmserve and its test dependencies. torch comes first: the CPU build
# (torch==2.13.0) where there is no NVIDIA GPU, the default CUDA build where there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/pip install -q torch
else
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e '.[dev]'
echo "warmserve is installed in .venv"
