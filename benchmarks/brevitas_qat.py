"""The recipe's QAT run with a brevitas student (B1's peer-library row), same budget as our rows.

Reached through ``recipes/qat_imagenet.py`` when the config says ``quantization: {backend:
brevitas, weight_bits: W, activation_bits: A}`` (recipes/configs/fmnist_resnet20_brevitas_*.yaml):

    python recipes/qat_imagenet.py --config recipes/configs/fmnist_resnet20_brevitas_w2a2.yaml \
        --output-dir outputs/benchmarks/standard/brevitas_w2a2 --set teacher.epochs=2 optim.warmup_steps=30

Everything except building the quantized student is the recipe's own code (``recipe.run``):
config, data, the FP teacher (the same cached file as every other row), the student's start from
the teacher's weights, the calibration batches, ``adq_hf.training.train`` (optimiser, schedule,
distillation, clipping, checkpoints, resume) and ``evaluate_topk``. ``Backend`` only converts the
student (``brevitas_peer.convert``, activation scales by ``brevitas_peer.calibrate`` on the
recipe's calibration batches, where our rows call ``adq_hf.quantize_model``), reports its bits and
saves it.

Outputs: ``results.json`` with the recipe's keys and ``final/``: the brevitas model's state dict
(``model.safetensors``, fake-quant weights in float and the learned activation scales; our packed
b-bit format does not apply) and ``brevitas_config.json``. ``load_final`` rebuilds the model from them.
"""

from __future__ import annotations

import json
import os
import sys

BREVITAS_KEYS = {"backend", "weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits", "layer_bits"}


def peer_settings(config: dict, recipe, keys, defaults: dict) -> dict:
    """A peer's ``quantization`` section, checked: known keys only, weights-only start, and the same
    bit checks as our rows (``ADQConfig``); errors are the recipe's one-line ``RecipeError``."""
    q = dict(config["quantization"])
    unknown = sorted(set(q) - set(keys))
    if unknown:
        raise recipe.RecipeError(f"quantization: backend {q['backend']} does not take {unknown}; "
                                 f"known fields: {sorted(keys)}")
    if config["init"] != "weights":
        raise recipe.RecipeError(f"init={config['init']!r}: backend {q['backend']} starts from the weights only")
    settings = {k: q.get(k, v) for k, v in defaults.items()}
    settings["layer_bits"] = settings.get("layer_bits") or {}
    from adq_hf import ADQConfig

    try:  # 2-8 bits; activation_bits None = weight-only
        ADQConfig(**{k: v for k, v in settings.items() if k in ADQConfig().to_dict()})
    except (TypeError, ValueError) as err:
        raise recipe.RecipeError(f"quantization: {err}") from None
    return settings


def quantization_settings(config: dict, recipe) -> dict:
    return peer_settings(config, recipe, BREVITAS_KEYS, {"weight_bits": 4, "activation_bits": 4, "first_layer_bits": 8,
                                                          "last_layer_bits": 8, "layer_bits": {}})


def _peer(recipe):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import brevitas_peer
    except ImportError as err:
        if recipe is None:
            raise
        raise recipe.RecipeError(f"quantization.backend=brevitas: {err}") from None
    return brevitas_peer


class Backend:
    """``recipe.AdqBackend``'s methods for a brevitas student."""

    name = "brevitas"
    checkpoints = True

    def __init__(self, config: dict, recipe):
        self.config, self.recipe = config, recipe
        self.settings = quantization_settings(config, recipe)
        self.peer = _peer(recipe)

    def quantize(self, student, calibration, accelerator, resume):
        try:
            self.peer.convert(student, calibration_batches=calibration, **self.settings)
        except ValueError as err:
            raise self.recipe.RecipeError(f"quantization: {err}") from None
        if self.settings["activation_bits"] is not None:
            self.peer.calibrate(student, calibration)
        return None

    def finish(self, student, evaluate):
        return student, None

    def report(self, student) -> dict:
        return {"average_weight_bits": self.peer.average_weight_bits(student), "bit_map": self.peer.bit_map(student),
                "quantization_config": dict(student.brevitas_config)}

    def save(self, student, final: str, resolved: dict, results: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(final, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
                  os.path.join(final, "model.safetensors"))
        with open(os.path.join(final, "brevitas_config.json"), "w") as fh:
            json.dump({**results["quantization_config"], "model": self.config["model"], "data_config": resolved},
                      fh, indent=2, default=str)


def load_final(folder: str):
    """The trained brevitas model from ``final/`` (``model.safetensors`` + ``brevitas_config.json``)."""
    import timm
    from safetensors.torch import load_file

    import adq_hf  # noqa: F401  (registers resnet20_cifar)

    peer = _peer(None)
    with open(os.path.join(folder, "brevitas_config.json")) as fh:
        cfg = json.load(fh)
    spec = cfg["model"]
    model = timm.create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                              **(spec.get("kwargs") or {}))
    peer.convert(model, cfg["weight_bits"], cfg["activation_bits"], cfg["first_layer_bits"], cfg["last_layer_bits"],
                 signed=cfg["signed_inputs"], layer_bits=cfg.get("layer_bits"))
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval()
