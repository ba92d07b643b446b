"""Mixed precision: per-layer sensitivity, exact bit allocation under a budget, and the bit report."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

from torch import nn

from .allocation import DEFAULT_CANDIDATES, allocate_bits, objective, quantization_error
from .report import write_report
from .sensitivity import estimate_sensitivity, exact_layer_traces


def plan_mixed_precision(
    model: nn.Module, config, calibration_data: Iterable, candidates=DEFAULT_CANDIDATES, method: str = "hutchinson"
) -> Tuple[Dict[str, int], Dict[str, float]]:
    """``(layer_bits, sensitivity)`` meeting ``config.target_avg_bits`` on the float ``model``.

    The layers ``plan_quantization`` would quantize at the default bits are allocated; the first and
    last layer and explicit ``layer_bits`` entries keep their bits and count in the average.
    """
    from ..surgery import plan_quantization

    plans = plan_quantization(model, config)
    fixed = {p.name: p.weight_bits for p in plans if p.role != "body" or config.bits_for(p.name) is not None}
    body = [p.name for p in plans if p.name not in fixed]
    batches = list(calibration_data)
    sensitivity = estimate_sensitivity(model, batches, method=method, num_batches=len(batches), layers=body,
                                       progress=False)
    bits = allocate_bits(model, sensitivity, target_avg_bits=config.target_avg_bits, candidates=candidates,
                         config=config, fixed=fixed)
    explicit = {p: b for p, b in config.layer_bits.items()}
    return {**explicit, **bits}, sensitivity


__all__ = [
    "DEFAULT_CANDIDATES",
    "allocate_bits",
    "estimate_sensitivity",
    "exact_layer_traces",
    "objective",
    "plan_mixed_precision",
    "quantization_error",
    "write_report",
]
