"""coremltools' DKM palettization (a learned codebook, weights only) as B1's codebook peer row.

    python recipes/qat_imagenet.py --config recipes/configs/fmnist_resnet20_dkm_w2.yaml \
        --output-dir outputs/benchmarks/standard/dkm_w2 --set teacher.epochs=6 optim.epochs=4

Reached through ``recipes/qat_imagenet.py`` when the config says ``quantization: {backend:
coreml_dkm, weight_bits: W}`` (needs the ``bench`` extra: coremltools). Everything but the student's
quantization is the recipe's own code: teacher, data, optimiser, schedule, distillation, budget.

The student: ``coremltools.optimize.torch.palettization.DKMPalettizer`` (DKM, arXiv 2108.12659:
differentiable k-means, the look-up table and the assignments learned with the weights) with its
default settings (one table per tensor, ``kmeans_max_iter``, ``palett_tau``, milestone 0: palettized
from the first step) and ``n_bits`` per layer from adq_hf's own layer selection
(``adq_hf.surgery.plan_quantization``): the first conv and the classifier at ``first_layer_bits`` /
``last_layer_bits`` (8), every other Conv2d/Linear at ``weight_bits``. ``weight_threshold`` is 0, so
small layers are palettized too. DKM cannot make more clusters than a layer has weights: a layer
with fewer than ``2**b`` weights gets ``floor(log2(weights))`` bits (ResNet-20's 144-weight first conv:
7 bits, 128 clusters), counted so in the average. Activations stay float (weight-only rows).
``palettizer.step()`` runs after every optimiser step (the recipe's ``on_step``); after training,
``finalize`` folds the tables into the weights (the evaluation in eval mode already uses them:
tested equal).

Outputs: ``results.json`` with the recipe's keys and ``final/``: the finalized model's state dict
(``model.safetensors``: weights that take at most ``2**b`` values per layer, plus coremltools'
``_COREML_`` table buffers) and ``dkm_config.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brevitas_qat import peer_settings  # noqa: E402

DKM_KEYS = {"backend", "weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits", "layer_bits"}


def layer_bits_plan(model, weight_bits: int, first_layer_bits: int = 8, last_layer_bits: int = 8,
                    layer_bits=None) -> Dict[str, int]:
    """``{layer: n_bits}``: adq_hf's selection and bits, capped at ``log2`` of the layer's weights."""
    from adq_hf import ADQConfig
    from adq_hf.surgery import plan_quantization

    config = ADQConfig(weight_bits=weight_bits, activation_bits=None, first_layer_bits=first_layer_bits,
                       last_layer_bits=last_layer_bits, layer_bits=layer_bits or None)
    modules = dict(model.named_modules())
    return {p.name: min(p.weight_bits, int(math.log2(modules[p.name].weight.numel()))) for p in plan_quantization(model, config)}


class Backend:
    """``recipe.AdqBackend``'s methods for a DKM-palettized student."""

    name = "coremltools DKM"
    # DKM's state dict holds lists of tensors (per-partition centroids and labels), which safetensors
    # checkpoints cannot store: the row runs without intermediate checkpoints and restarts if interrupted
    checkpoints = False

    def __init__(self, config: dict, recipe):
        self.config, self.recipe = config, recipe
        self.settings = peer_settings(config, recipe, DKM_KEYS, {"weight_bits": 4, "activation_bits": None,
                                                                 "first_layer_bits": 8, "last_layer_bits": 8,
                                                                 "layer_bits": {}})
        if self.settings["activation_bits"] is not None:
            raise recipe.RecipeError(f"quantization.activation_bits={self.settings['activation_bits']}: backend "
                                     "coreml_dkm palettizes weights only; leave activation_bits unset")
        try:
            import coremltools
            from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig
        except ImportError as err:
            raise recipe.RecipeError(f"quantization.backend=coreml_dkm needs coremltools "
                                     f"(pip install -c constraints.txt -e '.[bench]'): {err}") from None
        self.version = coremltools.__version__
        self._palettizer_cls, self._config_cls = DKMPalettizer, DKMPalettizerConfig
        self.palettizer, self.bits = None, {}

    def quantize(self, student, calibration, accelerator, resume):
        s = self.settings
        self.bits = layer_bits_plan(student, s["weight_bits"], s["first_layer_bits"], s["last_layer_bits"],
                                    s["layer_bits"])
        config = self._config_cls.from_dict({"module_name_configs": {
            name: {"n_bits": bits, "weight_threshold": 0} for name, bits in self.bits.items()}})
        self.palettizer = self._palettizer_cls(student, config)
        self.palettizer.prepare(inplace=True)
        return self.palettizer.step

    def finish(self, student, evaluate):
        return self.palettizer.finalize(student, inplace=True), None

    def report(self, student) -> dict:
        modules = dict(student.named_modules())
        bit_map = {name: {"weight_bits": bits, "activation_bits": None, "params": modules[name].weight.numel()}
                   for name, bits in self.bits.items()}
        total = sum(b["params"] for b in bit_map.values())
        return {"average_weight_bits": sum(b["weight_bits"] * b["params"] for b in bit_map.values()) / max(total, 1),
                "bit_map": bit_map,
                "quantization_config": {**self.settings, "backend": "coreml_dkm", "coremltools_version": self.version,
                                        "n_bits": dict(self.bits)}}

    def save(self, student, final: str, resolved: dict, results: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(final, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
                  os.path.join(final, "model.safetensors"))
        with open(os.path.join(final, "dkm_config.json"), "w") as fh:
            json.dump({**results["quantization_config"], "model": self.config["model"], "data_config": resolved},
                      fh, indent=2, default=str)
