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

from .base import ActivationQuantizer, grad_scale, register_activation_quantizer
from .fake_quant import count_at_least, smallest_float_where

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
        if n <= MAX_COMPARED_INTERVALS and x.dtype == d.dtype:
            zero_point, bounds = self._zero_point_and_bounds()
            return _N2UQFewIntervals.apply(x, start, d, scale, zero_point, bounds)
        return _N2UQFunction.apply(x, start, d, scale, self.zero_point)

    @torch.compiler.disable  # host synchronisations: one graph break under torch.compile
    def _zero_point_and_bounds(self):
        return self.zero_point, few_interval_bounds(self.start.detach(), self.intervals().detach())


# Up to this many intervals (bits <= 4), the forward counts thresholds passed with one comparison
# each and the backward sums per interval with masks; beyond, a binary search and per-element
# gathers cost less than 3n passes over the input (docs/methods.md, "Training cost").
MAX_COMPARED_INTERVALS = 15


def _lower_edges(start: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``L_0 .. L_{n-1}``: ``start`` and the running sums of the widths."""
    return torch.cat([start.reshape(1), start + torch.cumsum(d, 0)[:-1]])


class _N2UQFunction(torch.autograd.Function):
    """Forward and generalized-STE backward in closed form, for any number of intervals.

    Autograd through per-element gathers of the edges would scatter-add into ``n`` slots with
    atomics; per-interval sums by ``bincount`` are several times faster on CPU.
    """

    @staticmethod
    def forward(ctx, x, start, d, scale, zero_point: int):
        lower = _lower_edges(start, d)
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
        return (slope, *_edge_and_width_grads(per_edge, per_width, d), (grad_out * level).sum().reshape(scale.shape),
                None)


def _edge_and_width_grads(per_edge: torch.Tensor, per_width: torch.Tensor, d: torch.Tensor):
    """Gradients of ``start`` and the widths from the per-interval sums of ``slope`` and ``slope * u``:
    ``L_k`` moves with ``start`` and every width below ``k``."""
    grad_start = -per_edge.sum()
    later_edges = per_edge.flip(0).cumsum(0).flip(0) - per_edge  # sum over bins above k
    return grad_start.to(d.dtype), (-(later_edges + per_width)).to(d.dtype)


def few_interval_bounds(start: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``[3, n]``: the exact float thresholds of ``_N2UQFunction``'s rules, per interval ``k``:
    ``T_k`` (``level`` counts the ``T_k <= x``) and ``[A_k, B_k)``, where the gradient flows.

    ``_N2UQFunction`` puts ``x`` in interval ``j`` (``L_j <= x < L_{j+1}``), takes
    ``u = (x - L_j) / d_j`` in floats, adds 1 to the level when ``u >= 0.5`` and passes gradient when
    ``0 < u < 1``. Each rule is monotone in ``x``, so it switches at one float, found by
    ``smallest_float_where``; clipped to the interval, these give the same decisions for every ``x``.
    A few tiny ops and host synchronisations.
    """
    lower = _lower_edges(start, d)
    upper = torch.cat([lower[1:], lower.new_full((1,), math.inf)])
    half = smallest_float_where(lambda t: (t - lower) / d >= 0.5, lower, lower + d * 0.5)
    first_inside = smallest_float_where(lambda t: (t - lower) / d > 0, lower, torch.nextafter(lower, upper))
    first_at_one = smallest_float_where(lambda t: (t - lower) / d >= 1, lower, lower + d)
    end_inside = torch.maximum(torch.minimum(first_at_one, upper), first_inside)  # empty when equal
    return torch.stack([torch.minimum(half, upper), first_inside, end_inside])


class _N2UQFewIntervals(torch.autograd.Function):
    """``_N2UQFunction`` for few intervals, without searches or per-element gathers, from the exact
    thresholds of ``few_interval_bounds``: the output is bit-identical, the gradients equal up to
    the order of float sums. The forward counts thresholds passed (one comparison each); the
    backward builds each interval's 0/1 mask and takes masked dot products. Saved for backward: the
    input and the output, which the neighbouring layers keep alive anyway.
    """

    @staticmethod
    def forward(ctx, x, start, d, scale, zero_point: int, bounds):
        out = count_at_least(x, bounds[0])  # thresholds passed
        if zero_point:
            out.add_(zero_point)
        out.mul_(scale)
        ctx.save_for_backward(x, out, _lower_edges(start, d), d, scale, bounds)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out, lower, d, scale, bounds = ctx.saved_tensors
        rate = scale / d
        grad = grad_out.contiguous().reshape(-1)
        flat_x = x.contiguous().reshape(-1)
        # sums of g (x - L_k) as sums of g (x - L_0) minus (L_k - L_0) sums of g: x - L_0 < (k + 1) d_k
        # inside interval k, so no sum cancels by more than a factor n
        shifted = (flat_x - lower[0]).mul_(grad)
        masks = _masks_traced if torch.compiler.is_compiling() else _masks_eager
        per_edge, per_shifted, slope = masks(flat_x, grad, shifted, bounds[1], bounds[2], rate,
                                             want_slope=ctx.needs_input_grad[0])
        per_width = (per_shifted - (lower - lower[0]) * per_edge) * rate / d
        grad_x = slope.mul_(grad).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_scale = torch.dot(grad, out.reshape(-1)) / scale
        return (grad_x, *_edge_and_width_grads(per_edge * rate, per_width, d), grad_scale.reshape(scale.shape), None,
                None)


def _masks_eager(flat_x, grad, shifted, first_inside, end_inside, rate, want_slope: bool):
    """Per interval ``k``: ``sum g [A_k <= x < B_k]``, ``sum shifted [...]`` and the slope ``rate_k [...]``
    summed over ``k``. Each mask is two passes (a clamp to ``[A_k, prev(B_k)]`` and an equality), with
    the bounds as Python floats; the slope accumulates in place."""
    last_inside = torch.nextafter(end_inside, torch.full_like(end_inside, -math.inf))
    ranges = torch.stack([first_inside, last_inside, rate], 1).tolist()
    slope = torch.zeros_like(flat_x) if want_slope else None
    inside = torch.empty_like(flat_x)
    per_edge, per_shifted = [], []
    for first, last, rate_k in ranges:
        if not first <= last:  # an empty interval: no gradient
            per_edge.append(grad.new_zeros(()))
            per_shifted.append(grad.new_zeros(()))
            continue
        torch.eq(torch.clamp(flat_x, first, last, out=inside), flat_x, out=inside)
        per_edge.append(torch.dot(grad, inside))
        per_shifted.append(torch.dot(shifted, inside))
        if want_slope:
            slope.add_(inside, alpha=rate_k)
    return torch.stack(per_edge), torch.stack(per_shifted), slope


def _masks_traced(flat_x, grad, shifted, first_inside, end_inside, rate, want_slope: bool):
    """``_masks_eager`` without host synchronisation, for torch.compile (which fuses it into one loop)."""
    inside = [(flat_x >= a).to(flat_x.dtype) * (flat_x < b).to(flat_x.dtype)
              for a, b in zip(first_inside.unbind(0), end_inside.unbind(0))]
    per_edge = torch.stack([(grad * m).sum() for m in inside])
    per_shifted = torch.stack([(shifted * m).sum() for m in inside])
    slope = sum(m * r for m, r in zip(inside, rate.unbind(0))) if want_slope else None
    return per_edge, per_shifted, slope
