"""LSQ (Esser et al., 2020): uniform quantization with a learned step size, for weights and
activations. The baseline every adq_hf benchmark compares against.

Clip, then round (``round_ste(clamp(v))``, the paper's order): the clip's gradient mask then comes
from the unrounded ``v = x / step``, so every value strictly inside ``(qmin, qmax)`` passes its
gradient and the step gets ``round(v) - v`` there. Rounding first would hand the clip the rounded
value, and ``torch.clamp`` passes no gradient at its bounds: everything rounding to ``qmin`` or
``qmax`` (all of ``(0, 0.5)`` after ReLU) would get none, and the step ``qmax`` instead of
``qmax - v``. Both orders give the same values."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import (
    ActivationQuantizer,
    WeightQuantizer,
    grad_scale,
    register_activation_quantizer,
    register_weight_quantizer,
    weight_groups,
)
from .fake_quant import UniformFakeQuant


def signed_range(bits: int):
    """Integer range of a signed b-bit uniform quantizer: ``[-2**(b-1), 2**(b-1) - 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@register_weight_quantizer("lsq")
class LSQWeightQuantizer(WeightQuantizer):
    """Signed uniform levels ``k * step``; one step per tensor, per output channel or per group."""

    def __init__(self, bits: int, num_groups: int = 1):
        super().__init__(bits)
        self.qmin, self.qmax = signed_range(bits)
        self.step = nn.Parameter(torch.ones(num_groups, 1))

    @classmethod
    def from_config(cls, config, bits: int, weight_shape) -> "LSQWeightQuantizer":
        return cls(bits, num_groups=weight_groups(config, weight_shape))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.step.shape[0], -1)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        rows = self._rows(weight.detach().float())
        step = 2 * rows.abs().mean(dim=1, keepdim=True) / math.sqrt(self.qmax)
        self.step.copy_(step.clamp(min=1e-8))

    def levels(self) -> torch.Tensor:
        ints = torch.arange(self.qmin, self.qmax + 1, device=self.step.device, dtype=self.step.dtype)
        return self.step.detach() * ints

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self._rows(weight.detach())
        ints = torch.clamp(torch.round(rows / self.step.detach()), self.qmin, self.qmax)
        return (ints - self.qmin).long().reshape(weight.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        ints = codes.reshape(self.step.shape[0], -1).to(self.step.dtype) + self.qmin
        return (ints * self.step.detach()).reshape(codes.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self._rows(weight)
        factor = 1.0 / math.sqrt(rows.shape[1] * self.qmax)
        fake = UniformFakeQuant.apply(rows, self.step, self.qmin, self.qmax, factor)
        return fake.reshape(weight.shape).to(weight.dtype)


@register_activation_quantizer("lsq")
class LSQActivationQuantizer(ActivationQuantizer):
    """Uniform activation levels ``k * step``; unsigned after ReLU, signed otherwise (calibration data)."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def set_step(self, step: float) -> None:
        self.step.fill_(step)

    def effective_step(self, x: torch.Tensor, qmax: int) -> torch.Tensor:
        """The step ``x`` is quantized with (LSQ's gradient scaling applied); ASQ multiplies it."""
        return grad_scale(self.step, 1.0 / math.sqrt(x.numel() * qmax))

    def step_and_grad_factor(self, x: torch.Tensor, qmax: int):
        """``(step, factor)``: the step and the factor its gradient is scaled by inside the fused
        function (LSQ's ``1/sqrt(numel Qp)``); ASQ returns its effective step, already scaled, and 1."""
        return self.step, 1.0 / math.sqrt(x.numel() * qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        qmin, qmax = self.int_range()
        step, factor = self.step_and_grad_factor(x, qmax)
        return UniformFakeQuant.apply(x, step, qmin, qmax, factor)
