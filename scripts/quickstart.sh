#!/usr/bin/env bash
# Install everything, then run the main job on the embedded default data: train a full-precision
# ResNet-20 teacher on Fashion-MNIST, quantize it with ADQ (W2A2) and train it with distillation.
# About 10 minutes on 2 CPU cores. Extra arguments go to the recipe (e.g. --set optim.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python recipes/qat_imagenet.py --config recipes/configs/quickstart.yaml "$@"
