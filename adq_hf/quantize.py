"""``quantize_model``: plan, convert, calibrate — the entry point timm, transformers, the recipes and
PTQ call.

The flow goes one way: a mixed-precision budget is planned first (``adq_hf.mixed_precision``: sensitivity
-> bit map written into the config), then ``adq_hf.surgery.convert_model`` swaps the layers, then
activation quantizers are calibrated. Surgery depends on neither the planner nor the integrations.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

from torch import nn

from .config import ADQConfig
from .surgery import calibrate_activations, convert_model, plan_quantization

MAX_CALIBRATION_BATCHES = 8  # taken from an iterator (e.g. a DataLoader); lists are used whole


def quantize_model(
    model: nn.Module,
    config: ADQConfig,
    calibration_data: Optional[Iterable] = None,
    init_from_weights: bool = True,
) -> nn.Module:
    """Swap the quantizable layers (Linear, Conv1d, Conv2d, transformers' Conv1D, Embedding) for quantized ones and initialise their quantizers from the weights.

    ``calibration_data`` (an iterable of batches: tensors, ``(inputs, labels)`` or dicts of model
    inputs) calibrates the activation quantizers (``calibrate_activations``) and feeds the mixed-precision
    allocation when ``config.target_avg_bits`` is set (a list is used whole; from any other iterable,
    e.g. a DataLoader, the first ``MAX_CALIBRATION_BATCHES`` batches), and gives the importance of
    each weight when ``config.codebook_weighting`` is set (``adq_hf.importance``, on the float model).
    ``init_from_weights=False`` is for weights that are not loaded yet (meta device, pre-quantized
    checkpoints).
    """
    if not isinstance(config, ADQConfig):
        raise TypeError(f"quantize_model expects an adq_hf.ADQConfig, got {type(config).__name__}.")
    if config.target_avg_bits is not None and not config.layer_bits:
        if calibration_data is None:
            raise ValueError(
                f"ADQConfig.target_avg_bits={config.target_avg_bits} needs calibration data to allocate bits: "
                "pass quantize_model(model, config, calibration_data=...) or give layer_bits explicitly."
            )
        from .mixed_precision import plan_mixed_precision

        if not isinstance(calibration_data, (list, tuple)):  # a DataLoader: a few batches, not the data set
            calibration_data = list(itertools.islice(calibration_data, MAX_CALIBRATION_BATCHES))
        allocation = plan_mixed_precision(model, config, calibration_data)
        config.layer_bits, model.adq_sensitivity = dict(allocation), allocation.sensitivity
    importance = None
    if config.codebook_weighting is not None and init_from_weights:
        if calibration_data is None:
            raise ValueError(weighting_needs_data(config))
        from .importance import weight_importance

        if not isinstance(calibration_data, (list, tuple)):
            calibration_data = list(itertools.islice(calibration_data, MAX_CALIBRATION_BATCHES))
        importance = weight_importance(model, calibration_data, config.codebook_weighting,
                                       [p.name for p in plan_quantization(model, config)])
    convert_model(model, config, init_from_weights=init_from_weights, importance=importance)
    if calibration_data is not None and config.activation_bits is not None:
        whole = isinstance(calibration_data, (list, tuple))
        calibrate_activations(model, calibration_data, num_batches=None if whole else MAX_CALIBRATION_BATCHES)
    return model


def weighting_needs_data(config: ADQConfig) -> str:
    return (f"ADQConfig.codebook_weighting={config.codebook_weighting!r} fits the codebooks with importances from "
            "calibration data: pass adq_hf.quantize_model(model, config, calibration_data=...), or quantize without it "
            "(codebook_weighting=None, e.g. in from_pretrained) and call adq_hf.fit_codebooks(model, calibration_data, "
            f"method={config.codebook_weighting!r}) afterwards.")
