"""ASQ (Adaptive Step Size Quantization, arXiv 2504.17263): LSQ whose step is multiplied, per
sample (conv inputs) or per token (Linear inputs), by ``beta = adapter(x)``, a tiny MLP of the input.

Design choices (docs/methods.md has the reasons):
  * Adapter: ``Linear(C, C//4) -> ReLU -> Linear(C//4, 1)`` (one ``Linear(C, 1)`` when ``C < 8``),
    then ``clamp(beta, 2**-8, 2**8)``; the paper's final ReLU is subsumed by the positive lower
    bound (same value and gradient).
  * Conv inputs (``channel_dim=1``, NCHW) are average-pooled over the spatial axes first: one beta
    per sample. Linear inputs (``channel_dim=-1``, ``[..., C]``) get one beta per position (token),
    so a sentence is quantized the same whatever the padding or the other sentences of the batch.
  * ``beta`` starts at exactly 1 (last layer weight 0, bias 1), so an initialised ASQ equals LSQ.
  * The step is LSQ's (signedness and step from the calibration batches). Gradients as
    in LSQ with ``s * beta`` as the step: the input gets the straight-through gradient inside the
    clipping range (the adapter reads a detached copy of the input), ``s`` gets
    ``1/sqrt(numel Qp)`` scaling and each beta ``1/sqrt(n Qp)``, ``n`` the elements it scales.
  * The adapter is not an ``nn.Linear``: quantize_model, sensitivity and PTQ must not see it as a
    layer of the model. Its initial values come from a fixed-seed generator, so they are the same on
    every rank and in every build; calibration (``finish_calibration``, or the first batch when
    ``initialized`` is False) re-creates
    them, which is what repairs transformers' meta-device loading (parameters not in the checkpoint
    are allocated uninitialised). A checkpoint whose ``initialized`` is False holds these same
    values (nothing trains before the first batch), so that reset never discards loaded state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import grad_scale, register_activation_quantizer
from .lsq import LSQActivationQuantizer

BETA_MIN, BETA_MAX = 2.0**-8, 2.0**8
REDUCTION = 4  # hidden width C // 4
MIN_CHANNELS_FOR_HIDDEN = 2 * REDUCTION  # below this, C // 4 < 2: one Linear(C, 1)
ADAPTER_SEED = 0


class StepAdapter(nn.Module):
    """``[..., C] -> [..., 1]``: the step multiplier beta, exactly 1 at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        hidden = channels // REDUCTION if channels >= MIN_CHANNELS_FOR_HIDDEN else 0
        if hidden:
            self.hidden_weight = nn.Parameter(torch.empty(hidden, channels))
            self.hidden_bias = nn.Parameter(torch.empty(hidden))
        else:
            self.register_parameter("hidden_weight", None)
            self.register_parameter("hidden_bias", None)
        self.out_weight = nn.Parameter(torch.empty(1, hidden or channels))
        self.out_bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hidden layer: nn.Linear's default uniform(+-1/sqrt(C)) from a fixed seed; output: 0 and 1."""
        if self.hidden_weight is not None:
            generator = torch.Generator().manual_seed(ADAPTER_SEED)
            bound = 1.0 / math.sqrt(self.channels)
            for param in (self.hidden_weight, self.hidden_bias):  # made on the CPU: also under a meta context
                values = torch.rand(param.shape, generator=generator, device="cpu") * 2 * bound - bound
                param.copy_(values)
        self.out_weight.zero_()
        self.out_bias.fill_(1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.hidden_weight is not None:
            features = F.relu(F.linear(features, self.hidden_weight, self.hidden_bias))
        return torch.clamp(F.linear(features, self.out_weight, self.out_bias), BETA_MIN, BETA_MAX)

    def extra_repr(self) -> str:
        hidden = 0 if self.hidden_weight is None else self.hidden_weight.shape[0]
        return f"channels={self.channels}, hidden={hidden}"


@register_activation_quantizer("asq")
class ASQActivationQuantizer(LSQActivationQuantizer):
    """LSQ levels ``k * step * beta``; ``channel_dim`` 1 for conv inputs (pooled), -1 for Linear inputs."""

    def __init__(self, bits: int, channels: int, channel_dim: int = -1):
        super().__init__(bits)
        if channel_dim not in (1, -1):
            raise ValueError(
                f"channel_dim={channel_dim!r} is invalid: expected 1 (NCHW conv inputs) or -1 (Linear inputs)."
            )
        self.channel_dim = channel_dim
        self.adapter = StepAdapter(channels)

    @classmethod
    def from_config(cls, config, bits: int, in_features: Optional[int] = None, channel_dim: int = -1):
        if in_features is None:
            raise ValueError("activation_quantizer='asq' needs the layer's input channel count (in_features).")
        return cls(bits, in_features, channel_dim)

    @torch.no_grad()
    def set_step(self, step: float) -> None:
        super().set_step(step)
        self.adapter.reset_parameters()

    def multiplier(self, x: torch.Tensor) -> torch.Tensor:
        """beta, shaped to broadcast against ``x``: ``[N, 1, ...]`` (conv) or ``[..., 1]`` (Linear)."""
        features = x.detach()
        if self.channel_dim == 1:
            beta = self.adapter(features.mean(dim=tuple(range(2, x.dim()))))
            return beta.reshape(beta.shape[0], *([1] * (x.dim() - 1)))
        return self.adapter(features)

    def effective_step(self, x: torch.Tensor, qmax: int) -> torch.Tensor:
        """LSQ's step times beta; each beta's gradient scaled by ``1/sqrt(n Qp)``, ``n`` the elements it scales."""
        beta = self.multiplier(x)
        per_beta = x.numel() // max(beta.numel(), 1)
        return super().effective_step(x, qmax) * grad_scale(beta, 1.0 / math.sqrt(per_beta * qmax))

    def step_and_grad_factor(self, x: torch.Tensor, qmax: int):
        return self.effective_step(x, qmax), 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}"
