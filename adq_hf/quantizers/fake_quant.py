"""Fused training forward/backward pieces the quantizers share (speed, not new maths).

Every function here reproduces the value of the plain PyTorch expression it replaces bit for bit
and its gradients up to float rounding order (tests/test_fake_quant.py compares both against
frozen copies of the earlier implementations). Why they are faster on a CPU (docs/methods.md,
"Training cost", has the measurements):
  * one autograd node per quantizer instead of a chain of small ones, each of which allocated a
    full-size tensor and saved another for backward;
  * no ``where``/``masked_fill``/bool-to-float conversions or per-element gathers (``index``,
    ``searchsorted``, ``bincount``): those run unvectorised on the CPU, 10-40x slower per element
    than an arithmetic pass. Masks are built as ``uint8`` and converted once;
  * only the input (which the previous layer keeps alive anyway) and, for N2UQ, a ``uint8`` code
    are saved for backward (N2UQ saved an int64 index and two float tensors before).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

_INT_OF_FLOAT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                 torch.float64: torch.int64}


def at_least(x: torch.Tensor, threshold: torch.Tensor, out=None) -> torch.Tensor:
    """``x >= threshold`` as 0/1 in ``x``'s dtype. Written straight into a float tensor, a comparison
    is as fast as a multiplication on the CPU; a bool result (then converted) costs 3-5 times more."""
    return torch.ge(x, threshold, out=torch.empty_like(x) if out is None else out)


def count_at_least(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many of the (few) ``thresholds`` are ``<= x``, in ``x``'s dtype: one comparison each."""
    values = thresholds.unbind(0)
    count = at_least(x, values[0])
    passed = torch.empty_like(x) if len(values) > 1 else None
    for t in values[1:]:
        count.add_(at_least(x, t, out=passed))
    return count


def _order_key(t: torch.Tensor) -> torch.Tensor:
    """int64 keys that order floats as the floats are ordered (-0.0 and 0.0 share the key 0)."""
    bits = t.view(_INT_OF_FLOAT[t.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (torch.finfo(t.dtype).bits - 1)) - 1)
    return torch.where(bits < 0, -magnitude, bits)


def _float_of_key(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.finfo(dtype).bits
    sign = -(1 << 63) if width == 64 else 1 << (width - 1)
    bits = torch.where(key < 0, (-key) | sign, key)
    return bits.to(_INT_OF_FLOAT[dtype]).view(dtype)


def smallest_float_where(predicate: Callable[[torch.Tensor], torch.Tensor], below: torch.Tensor,
                         guess: torch.Tensor) -> torch.Tensor:
    """Per element, the smallest float ``t > below`` (in ``below``'s dtype) with ``predicate(t)``, for a
    predicate that is monotone in ``t``, false at ``below`` and true at ``+inf``.

    Used to turn a rule such as ``(x - L) / d >= 0.5`` (evaluated in floats, with its roundings) into
    one exact threshold: ``x >= t`` then decides every ``x`` as the rule does. ``guess`` is usually the
    answer; when it is not (rounding near it), a bisection over the float ordering finds it.
    """
    # the guess and its float neighbours: the answer is the first of them where the predicate holds
    down, up = torch.full_like(guess, -math.inf), torch.full_like(guess, math.inf)
    below_guess = torch.nextafter(guess, down)
    above_guess = torch.nextafter(guess, up)
    window = torch.stack([torch.nextafter(below_guess, down), below_guess, guess, above_guess,
                          torch.nextafter(above_guess, up)])
    holds = predicate(window)
    if bool((~holds[0] & holds[-1]).all()):
        first = holds.to(torch.uint8).argmax(dim=0, keepdim=True)  # monotone: the first True
        return window.gather(0, first).squeeze(0)
    lo, hi = _order_key(below), _order_key(torch.full_like(below, math.inf))
    for _ in range(torch.finfo(below.dtype).bits + 1):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = predicate(_float_of_key(mid, below.dtype))
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return _float_of_key(hi, below.dtype)


class UniformFakeQuant(torch.autograd.Function):
    """``round(clamp(x / step, qmin, qmax)) * step`` with LSQ's gradients, as one autograd node.

    ``step`` broadcasts against ``x`` (a scalar, one per row, one per sample); its gradient is summed
    back to its shape and multiplied by ``step_grad_factor`` (LSQ's gradient scale, which
    ``base.grad_scale`` applies as two more autograd nodes). Gradients (those of the unfused expression with a straight-through round):
    ``x``: ``grad`` where ``qmin <= x / step <= qmax`` (``torch.clamp``'s closed range), else 0;
    ``step``: ``grad * (round(c) - [inside] * x / step)`` with ``c`` the clamped value.
    """

    @staticmethod
    def forward(ctx, x, step, qmin: int, qmax: int, step_grad_factor: float = 1.0):
        ctx.save_for_backward(x, step)
        ctx.qmin, ctx.qmax, ctx.step_grad_factor = qmin, qmax, step_grad_factor
        return torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        scaled = torch.div(x, step)
        if torch.compiler.is_compiling():  # fused by the compiler: plain comparisons
            clamped = scaled.clamp(ctx.qmin, ctx.qmax)
            grad_x = ((scaled > ctx.qmin) & (scaled < ctx.qmax)).to(scaled.dtype) * grad
        else:
            # torch.clamp passes gradient strictly inside (qmin, qmax): clamp to the floats just
            # inside the bounds, and what is unchanged was inside (two passes, no bool tensors).
            # round() of it is round(clamp(v, qmin, qmax)).
            clamped = scaled.clamp(*_open_range(ctx.qmin, ctx.qmax, scaled.dtype))
            grad_x = torch.eq(clamped, scaled, out=torch.empty_like(scaled)).mul_(grad)
        grad_step = None
        if ctx.needs_input_grad[1]:
            # d/dstep [round(c) * step] with c = clamp(x / step): round(c) - [inside] x / step
            per_element = clamped.round_().mul_(grad).addcmul_(grad_x, scaled, value=-1)
            grad_step = sum_to_shape(per_element, step.shape)
            if ctx.step_grad_factor != 1.0:
                grad_step = grad_step * ctx.step_grad_factor
        return grad_x, grad_step, None, None, None


@functools.lru_cache(maxsize=None)
def _open_range(low: int, high: int, dtype: torch.dtype):
    """The smallest float above ``low`` and the largest below ``high``, in ``dtype``, as Python floats."""
    bounds = torch.tensor([low, high], dtype=dtype)
    return tuple(torch.nextafter(bounds, torch.tensor([math.inf, -math.inf], dtype=dtype)).tolist())


def sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the axes a tensor of ``shape`` was broadcast along."""
    if tuple(shape) == tuple(t.shape):
        return t
    if len(shape) == 0 or math.prod(shape) == 1:
        return t.sum().reshape(shape)
    lead = t.dim() - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1)
    return t.sum(dim=axes, keepdim=True).reshape(shape)
