"""N2UQ (Liu et al., CVPR 2022): non-uniform input thresholds, uniform integer output levels.

The input axis is cut into ``n = 2**bits - 1`` learnable intervals ``d_1..d_n`` starting at
``start``: edges ``L_0 = start``, ``L_i = L_{i-1} + d_i``. The threshold of interval ``i`` is its
midpoint, so thresholds are sorted by construction (``d_i = |raw_i| + eps > 0``), whatever the
optimiser does. The output is ``scale * (zero_point + number of thresholds passed)``: uniform
integers for the hardware. Backward is the generalized straight-through estimator: inside
interval ``i`` the output moves linearly by one level over the interval, slope ``scale / d_i``,
which also gives gradients to ``start``, every ``d_i`` and ``scale``.

Signed form (inputs that can be negative): integers ``-2**(b-1) .. 2**(b-1)-1``; unsigned (after
ReLU): ``0 .. 2**b - 1``. Chosen from the calibration data. Initialisation makes the quantizer equal
to a uniform quantizer whose step comes from the calibration batches (``ActivationQuantizer``'s
range estimators); training then moves the thresholds apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ActivationQuantizer, grad_scale, register_activation_quantizer, straight_through

_EPS = 1e-6


@register_activation_quantizer("n2uq")
class N2UQActivationQuantizer(ActivationQuantizer):
    def __init__(self, bits: int):
        super().__init__(bits)
        n = 2**bits - 1
        self.start = nn.Parameter(torch.zeros(()))
        self.raw_intervals = nn.Parameter(torch.ones(n))
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def zero_point(self) -> int:
        """Integer level of inputs below the first threshold."""
        return -(2 ** (self.bits - 1)) if bool(self.signed) else 0

    def intervals(self) -> torch.Tensor:
        return self.raw_intervals.abs() + _EPS

    def thresholds(self) -> torch.Tensor:
        """Sorted input thresholds ``T_1 < ... < T_n`` (midpoints of the intervals)."""
        d = self.intervals()
        return self.start + torch.cumsum(d, 0) - d / 2

    @torch.no_grad()
    def set_step(self, step: float) -> None:
        """Start as the uniform quantizer of this step: equal intervals, zero maps to zero."""
        self.scale.fill_(step)
        # d = |raw| + eps must equal the step exactly, or the eps offsets add up along the intervals
        # and the quantizer would not start as the uniform one
        self.raw_intervals.fill_(step - _EPS if step > 2 * _EPS else step)
        self.start.fill_(step * self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        n = self.raw_intervals.numel()
        g = 1.0 / math.sqrt(x.numel() * n)
        start, scale = grad_scale(self.start, g), grad_scale(self.scale, g)
        d = grad_scale(self.raw_intervals, g).abs() + _EPS
        return _N2UQFunction.apply(x, start, d, scale, self.zero_point)


class _N2UQFunction(torch.autograd.Function):
    """Forward and generalized-STE backward in closed form.

    Autograd through per-element gathers of the edges would scatter-add into ``n`` slots with
    atomics; per-interval sums by ``bincount`` are several times faster on CPU.
    """

    @staticmethod
    def forward(ctx, x, start, d, scale, zero_point: int):
        lower = torch.cat([start.reshape(1), start + torch.cumsum(d, 0)[:-1]])  # L_0 .. L_{n-1}
        j = torch.searchsorted(lower[1:].contiguous(), x.contiguous(), right=True)
        u = (x - lower[j]) / d[j]
        level = j.to(x.dtype) + (u >= 0.5).to(x.dtype) + zero_point
        ctx.save_for_backward(j, u, d, scale, level)
        return scale * level

    @staticmethod
    def backward(ctx, grad_out):
        j, u, d, scale, level = ctx.saved_tensors
        n = d.numel()
        inside = (u > 0) & (u < 1)
        slope = torch.where(inside, grad_out * scale / d[j], torch.zeros((), dtype=grad_out.dtype))
        flat_j = j.reshape(-1)
        # d out / d L_j = -slope; d out / d d_j = -slope * u (x - L_j = u d_j)
        per_edge = torch.bincount(flat_j, weights=slope.reshape(-1), minlength=n)
        per_width = torch.bincount(flat_j, weights=(slope * u).reshape(-1), minlength=n)
        grad_start = -per_edge.sum()
        later_edges = per_edge.flip(0).cumsum(0).flip(0) - per_edge  # sum over bins above k
        grad_d = -(later_edges + per_width)
        grad_scale = (grad_out * level).sum()
        return slope, grad_start.to(d.dtype), grad_d.to(d.dtype), grad_scale.reshape(scale.shape), None
