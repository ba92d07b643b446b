"""POST (Power Of Square root of Two, arXiv 2504.17263): non-uniform weight levels ``alpha * m``
with magnitudes ``m`` powers of sqrt(2), dequantized through a per-channel look-up table.

Design choices (docs/methods.md has the reasons):
  * Exactly ``2**b`` levels: one exact zero, ``K = 2**(b-1)`` negative magnitudes
    ``sqrt(2)**-k, k = 0..K-1`` and ``K - 1`` positive ones (``k = 0..K-2``), so both sides reach
    ``alpha`` and the spare code is one extra fine level on the negative side (the same side as the
    extra code of a two's-complement integer). The public reference builds ``2**b + 1`` levels with
    a power-of-two base; a b-bit code cannot address that.
  * One learnable ``alpha`` per output channel, initialised to the 0.99 quantile of ``|w|`` of the
    channel. POST is per channel by definition, so ``ADQConfig.granularity`` does not apply to it.
  * Nearest level of ``w / alpha`` (values beyond ``[-1, 1]`` take the end levels), straight-through
    gradient to ``w`` inside ``[-alpha, alpha]``; ``alpha`` gets LSQ's gradient
    (``m - w/alpha`` inside, ``m = +-1`` outside) scaled by ``1/sqrt(weights per channel)`` (LSQ's
    ``1/sqrt(n Qp)`` with ``Qp = 1``: the normalised levels end at 1).
  * ``forward`` and ``decode`` both return the product ``alpha * m[code]`` of the same two floats,
    so a packed checkpoint decodes to the trained weights bit for bit.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch
from torch import nn

from .base import WeightQuantizer, grad_scale, register_weight_quantizer, straight_through

INIT_QUANTILE = 0.99


def post_levels(bits: int) -> torch.Tensor:
    """The ``2**bits`` normalised levels, ascending (float64): ``-1 .. -sqrt(2)**-(K-1), 0,
    sqrt(2)**-(K-2) .. 1`` with ``K = 2**(bits-1)``."""
    k = 2 ** (bits - 1)
    magnitudes = torch.pow(torch.tensor(0.5, dtype=torch.float64), torch.arange(k, dtype=torch.float64) / 2)
    return torch.cat([-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes[: k - 1].flip(0)])


@lru_cache(maxsize=None)
def _tables(bits: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(levels, midpoints)`` in ``dtype`` on ``device``. Not buffers: constants of ``bits`` that
    transformers' meta-device loading would otherwise replace with uninitialised memory."""
    levels = post_levels(bits)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels.to(device=device, dtype=dtype), midpoints.to(device=device, dtype=dtype)


@register_weight_quantizer("post")
class POSTWeightQuantizer(WeightQuantizer):
    """Levels ``alpha[c] * post_levels(bits)`` for output channel ``c``."""

    def __init__(self, bits: int, out_channels: int):
        super().__init__(bits)
        self.alpha = nn.Parameter(torch.ones(out_channels, 1))

    @classmethod
    def from_config(cls, config, bits: int, weight_shape) -> "POSTWeightQuantizer":
        return cls(bits, out_channels=weight_shape[0])

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.alpha.shape[0], -1)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        top = torch.quantile(self._rows(weight.detach()).abs().float(), INIT_QUANTILE, dim=1, keepdim=True)
        self.alpha.copy_(top.clamp(min=1e-8))  # an all-zero channel: any positive alpha maps it to 0

    def _codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of the nearest normalised level of ``rows / alpha``; ties go to the lower level."""
        scaled = rows.detach() / self.alpha.detach()
        midpoints = _tables(self.bits, scaled.device, scaled.dtype)[1]
        return torch.searchsorted(midpoints, scaled.contiguous())

    def normalised_levels(self) -> torch.Tensor:
        return _tables(self.bits, self.alpha.device, self.alpha.dtype)[0]

    def levels(self) -> torch.Tensor:
        return self.alpha.detach() * self.normalised_levels()

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        return self._codes(self._rows(weight)).reshape(weight.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        flat = codes.reshape(self.alpha.shape[0], -1).long()
        return (self.normalised_levels()[flat] * self.alpha.detach()).reshape(codes.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self._rows(weight)
        alpha = grad_scale(self.alpha, 1.0 / math.sqrt(rows.shape[1]))
        scaled = torch.clamp(rows / alpha, -1.0, 1.0)
        level = straight_through(self.normalised_levels()[self._codes(rows)], scaled)
        return (level * alpha).reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, out_channels={self.alpha.shape[0]}"
