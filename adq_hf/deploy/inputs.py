"""Input quantizers in deploy form: their eval forward with the data-dependent branches resolved,
in ops ONNX has (exact N2UQ thresholds, LSQ/ASQ round-and-clip)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import kernels

MAX_THRESHOLD_STEPS = 4096


@torch.no_grad()
def n2uq_thresholds(quantizer) -> Optional[torch.Tensor]:
    """The exact float32 thresholds of an N2UQ quantizer's eval forward: its output is
    ``scale * (zero_point + #{thresholds <= x})`` for every float32 ``x``, bit for bit.

    N2UQ finds the interval ``j`` of ``x`` (edges ``L``, widths ``d``) and adds one level when
    ``(x - L_j) / d_j >= 0.5``. In float32 that test is monotone in ``x``, so it switches at one float
    ``t_j`` in ``(L_j, L_{j+1}]``, found here by stepping one float at a time from the computed
    midpoint with the same float32 operations. Then ``j + [x >= t_j]`` is the number of ``t`` not
    above ``x``: a few comparisons (or one ``searchsorted``) instead of a search, two gathers and a
    division. ``None`` if a threshold is not found within ``MAX_THRESHOLD_STEPS`` floats or falls
    outside its interval (the quantizer's own forward is used then).
    """
    d = quantizer.intervals().detach().float()
    start = quantizer.start.detach().float()
    lower = torch.cat([start.reshape(1), start + torch.cumsum(d, 0)[:-1]])  # as in _N2UQFunction.forward

    def passes(x):
        return (x - lower) / d >= 0.5

    t = lower + d / 2
    below, above = torch.full_like(t, -math.inf), torch.full_like(t, math.inf)
    for _ in range(MAX_THRESHOLD_STEPS):
        prev = torch.nextafter(t, below)
        ok, ok_prev = passes(t), passes(prev)
        if bool((ok & ~ok_prev).all()):
            # the count equals j + [x >= t_j] only if each t_j lies in its interval: not so when a width
            # is below the float spacing of its edge (an empty interval); then keep the quantizer's forward
            return t.contiguous() if bool((t[:-1] <= lower[1:]).all()) else None
        t = torch.where(~ok, torch.nextafter(t, above), torch.where(ok_prev, prev, t))
    return None


# Up to this many thresholds (4-bit inputs), counting them one comparison at a time is faster than
# searchsorted (measured on 1x16x28x28 inputs at batch 64: 2.8 vs 6.3 ms for 3, 13.8 vs 16.0 ms for 15).
COMPARE_MAX_THRESHOLDS = 15


# ONNX form of a threshold count above this many thresholds (8-bit inputs: 255): two levels of
# comparisons, COARSE_GROUP thresholds each, instead of one comparison per threshold and element.
COARSE_GROUP = 16


def _n2uq_onnx_form(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Beyond COMPARE_MAX_THRESHOLDS thresholds, the N2UQ count in few ONNX operations (one comparison per
    threshold and element was most of an exported ResNet-20's run time, docs/deploy.md): the group of
    COARSE_GROUP sorted thresholds that holds ``x`` is found with one comparison per group, then ``x`` is
    compared with that group's thresholds only (a ``Gather``). The same count, so the same values.
    ``None`` for fewer thresholds (the comparison chain is the fastest form in onnxruntime then)."""
    thresholds = layer._buffers["input_thresholds"]
    n = thresholds.numel()
    if n <= COMPARE_MAX_THRESHOLDS:
        return None
    groups = n // COARSE_GROUP + 1  # at least one padding entry: the last group's last threshold is +inf
    padded = torch.cat([thresholds, thresholds.new_full((groups * COARSE_GROUP - n,), math.inf)])
    table = padded.reshape(groups, COARSE_GROUP)
    xu = x.unsqueeze(-1)
    coarse = (xu >= table[:, -1]).sum(dim=-1)  # groups passed whole: all their thresholds are <= x
    fine = (xu >= table[coarse]).sum(dim=-1)  # thresholds passed in the next group
    count = (coarse * COARSE_GROUP + fine).to(x.dtype)
    return layer.input_quantizer.scale * (count + layer.__dict__["_input_zero_point"])


def _n2uq_form(layer, x: torch.Tensor) -> torch.Tensor:
    thresholds = layer._buffers["input_thresholds"]
    if layer.__dict__.get("_exporting"):
        out = _n2uq_onnx_form(layer, x)
        if out is not None:
            return out
    elif not torch.compiler.is_compiling():  # one C++ loop, the same bits
        out = kernels.count_thresholds(x, thresholds, layer.__dict__["_input_zero_point"],
                                       layer._modules["input_quantizer"]._parameters["scale"])
        if out is not None:
            return out
    if thresholds.numel() <= COMPARE_MAX_THRESHOLDS:
        count = (x >= thresholds[0]).to(x.dtype)
        for k in range(1, thresholds.numel()):
            count = count + (x >= thresholds[k]).to(x.dtype)
    else:
        count = torch.searchsorted(thresholds, x.contiguous(), right=True).to(x.dtype)
    return layer.input_quantizer.scale * (count + layer.__dict__["_input_zero_point"])


def _lsq_form(layer, x: torch.Tensor) -> torch.Tensor:
    quantizer = layer.input_quantizer
    qmin, qmax = layer.__dict__["_input_range"]
    step = quantizer.step
    multiplier = getattr(quantizer, "multiplier", None)  # LSQ subclasses that scale the step per input (ASQ)
    if multiplier is not None:
        step = step * multiplier(x)
    return torch.clamp(torch.round(x / step), qmin, qmax) * step


def input_form(layer):
    """The deploy form of a layer's (calibrated) input quantizer: a function ``(layer, x) -> x_q``
    equal to the quantizer's eval forward, with its data-dependent branches (calibration,
    signedness) resolved now and in ops ONNX has. ``None`` when there is none (not calibrated yet,
    another quantizer type): the quantizer's own forward runs."""
    from ..quantizers import LSQActivationQuantizer, N2UQActivationQuantizer

    quantizer = layer.input_quantizer
    if quantizer is None or not bool(quantizer.initialized):
        return None
    if type(quantizer) is N2UQActivationQuantizer:
        thresholds = n2uq_thresholds(quantizer)
        if thresholds is None:
            return None
        layer._buffers["input_thresholds"] = thresholds.to(quantizer.scale.device)
        layer.__dict__["_input_zero_point"] = quantizer.zero_point
        return _n2uq_form
    if isinstance(quantizer, LSQActivationQuantizer):
        layer.__dict__["_input_range"] = quantizer.int_range()
        return _lsq_form
    return None
