"""Mixed precision: per-layer sensitivity, exact bit allocation under a budget, and the bit report.

docs/mixed_precision.md defines "average weight bits" and states the choices made here.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

from torch import nn

from .allocation import (
    DEFAULT_CANDIDATES,
    allocate_bits,
    average_bits,
    candidate_stats,
    layer_bytes,
    lut_bytes,
    objective,
    quantization_error,
)
from .report import write_report
from .sensitivity import (default_loss, estimate_sensitivity, exact_gauss_newton_traces, exact_layer_traces,
                          weight_layers)


class BitAllocation(dict):
    """``{layer name: bits}`` (a plain dict for ``ADQConfig.layer_bits``) that also carries the
    ``sensitivity`` it was allocated from."""

    def __init__(self, bits: Dict[str, int], sensitivity: Optional[Dict[str, float]] = None):
        super().__init__(bits)
        self.sensitivity = dict(sensitivity or {})


def plan_mixed_precision(
    model: nn.Module,
    config,
    calibration_data: Iterable,
    candidates=DEFAULT_CANDIDATES,
    method: Optional[str] = None,
    max_iters: Optional[int] = None,
    progress: bool = False,
    loss_fn=None,
) -> BitAllocation:
    """``{layer name: bits}`` meeting ``config.target_avg_bits`` on the float ``model``; the result's
    ``.sensitivity`` holds the per-layer sensitivities (the bit report shows them).

    The layers ``plan_quantization`` gives the role "body" are allocated from ``candidates``; the first
    and last layer (at ``first_layer_bits``/``last_layer_bits``) and layers matched by an explicit
    ``config.layer_bits`` entry keep their bits and count in the average; float layers do not count.
    Every batch of ``calibration_data`` is used for the sensitivity (pass a few: the recipe passes 4);
    ``loss_fn`` replaces ``default_loss``; ``method`` and ``max_iters`` go to ``estimate_sensitivity``
    (default: the Gauss-Newton estimator, Hutchinson with a ``loss_fn``).
    """
    from ..surgery import plan_quantization

    if config.target_avg_bits is None:
        raise ValueError("plan_mixed_precision needs ADQConfig.target_avg_bits (the average weight-bit budget).")
    plans = [p for p in plan_quantization(model, config) if p.tied_to is None]  # a tied weight: under its owner
    fixed = {p.name: p.weight_bits for p in plans if p.role != "body" or config.bits_for(p.name) is not None}
    body = [p.name for p in plans if p.name not in fixed]
    if not body:
        raise ValueError("target_avg_bits: no layer is left to allocate (every quantized layer has fixed bits).")
    batches = list(calibration_data)
    if not batches:
        raise ValueError("plan_mixed_precision got no calibration batch.")
    sensitivity = estimate_sensitivity(model, batches, loss_fn=loss_fn, method=method, num_batches=len(batches),
                                       max_iters=max_iters, layers=body, progress=progress)
    bits = allocate_bits(model, sensitivity, target_avg_bits=config.target_avg_bits, candidates=candidates,
                         config=config, fixed=fixed)
    explicit = dict(config.layer_bits)
    return BitAllocation({**explicit, **bits}, sensitivity)


__all__ = [
    "BitAllocation",
    "DEFAULT_CANDIDATES",
    "allocate_bits",
    "average_bits",
    "candidate_stats",
    "default_loss",
    "estimate_sensitivity",
    "exact_gauss_newton_traces",
    "exact_layer_traces",
    "layer_bytes",
    "lut_bytes",
    "objective",
    "plan_mixed_precision",
    "quantization_error",
    "weight_layers",
    "write_report",
]
