"""ADQ weight quantizer: a codebook with an exact zero, initialised from weight quantiles and
adapted online by an exponential moving average of the weights assigned to each level.

Design choices (docs/methods.md has the reasons and measurements):
  * ``2**bits`` levels: one exact zero, ``2**bits - 1`` non-zero levels split between the negative
    and positive side; the side with the larger total magnitude gets the odd level (as NF4 does,
    but chosen from the data instead of always positive), so no code is wasted.
  * Quantile initialisation: the ``k`` levels of a side are that side's quantiles at
    ``(i - 0.5) / k``, the centres of ``k`` equal-mass bins. A side with no weights mirrors the other.
  * EMA adaptation: nearest-level assignment, ``c <- m c + (1 - m) mean(assigned)``, zero fixed,
    empty levels unchanged, levels kept sorted. Updates are derived from the weights only, which
    DDP keeps identical on every rank, so codebooks stay identical without communication. An update
    runs in a training forward when the weight has changed since the last one (its in-place version
    counter moved, i.e. an optimiser step happened), every ``update_interval`` such steps; gradient
    accumulation micro-steps therefore never update twice.
  * Straight-through gradient to the float weight.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import WeightQuantizer, register_weight_quantizer, straight_through


def _side_counts(weight_rows: torch.Tensor, num_nonzero: int):
    """Split ``num_nonzero`` levels between negative and positive sides, per row."""
    neg_mass = weight_rows.clamp(max=0).abs().sum(dim=1)
    pos_mass = weight_rows.clamp(min=0).sum(dim=1)
    small = num_nonzero // 2
    big = num_nonzero - small
    pos = torch.where(pos_mass >= neg_mass, big, small)
    return num_nonzero - pos, pos


def _side_levels(magnitudes: torch.Tensor, k: int, init: str, fallback: Optional[torch.Tensor]) -> torch.Tensor:
    """``k`` positive level magnitudes for one side of one row, ascending."""
    if k == 0:
        return magnitudes.new_zeros(0)
    if magnitudes.numel() == 0:
        if fallback is not None and fallback.numel() > 0:
            magnitudes = fallback
        else:  # an all-zero row: any distinct tiny levels will do, every weight maps to zero
            return torch.arange(1, k + 1, dtype=magnitudes.dtype, device=magnitudes.device) * 1e-8
    if init == "quantile":
        probs = (torch.arange(k, dtype=magnitudes.dtype, device=magnitudes.device) + 0.5) / k
        return torch.quantile(magnitudes, probs)
    # "uniform": equally spaced up to the largest magnitude (the ablation of quantile init)
    top = magnitudes.max()
    return top * torch.arange(1, k + 1, dtype=magnitudes.dtype, device=magnitudes.device) / k


def initial_codebook(weight_rows: torch.Tensor, bits: int, init: str = "quantile") -> torch.Tensor:
    """Codebook ``[rows, 2**bits]`` (ascending, one exact zero per row) for ``weight_rows [rows, n]``."""
    rows = weight_rows.detach().to(torch.float32)
    num_nonzero = 2**bits - 1
    neg_counts, pos_counts = _side_counts(rows, num_nonzero)
    books = []
    for r in range(rows.shape[0]):
        row = rows[r]
        neg_mag, pos_mag = -row[row < 0], row[row > 0]
        neg = _side_levels(neg_mag, int(neg_counts[r]), init, pos_mag)
        pos = _side_levels(pos_mag, int(pos_counts[r]), init, neg_mag)
        books.append(torch.cat([-neg.flip(0), rows.new_zeros(1), pos]))
    return torch.stack(books)


def nearest_codes(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of each row's (sorted) codebook; ties go to the lower level."""
    midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), rows.contiguous())


@register_weight_quantizer("adq")
class CodebookWeightQuantizer(WeightQuantizer):
    """Non-uniform codebook quantizer (ADQ). ``per_channel`` gives each output channel its own levels."""

    def __init__(
        self,
        bits: int,
        num_groups: int = 1,
        init: str = "quantile",
        ema_decay: float = 0.99,
        update_interval: int = 1,
        adapt: bool = True,
    ):
        super().__init__(bits)
        self.init = init
        self.ema_decay = float(ema_decay)
        self.update_interval = int(update_interval)
        self.adapt = bool(adapt)
        self.register_buffer("codebook", torch.zeros(num_groups, 2**bits))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # optimiser steps seen (saved, so a resumed run keeps the update_interval phase)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # weight version at the last forward; None after a load: the checkpoint was taken right
        # after an optimiser step, so the first training forward counts as a new step
        self._last_version: Optional[int] = None

    @classmethod
    def from_config(cls, config, bits: int, weight_shape) -> "CodebookWeightQuantizer":
        groups = weight_shape[0] if config.granularity == "per_channel" else 1
        return cls(
            bits,
            num_groups=groups,
            init=config.codebook_init,
            ema_decay=config.ema_decay,
            update_interval=config.ema_update_interval,
            adapt=config.codebook_update == "ema",
        )

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.codebook.shape[0], -1)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        self.codebook.copy_(initial_codebook(self._rows(weight), self.bits, self.init).to(self.codebook))
        self.num_updates.zero_()  # buffers may hold garbage (transformers creates missing keys empty)
        self.num_steps.zero_()
        self._last_version = weight._version

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor) -> None:
        """One EMA step of every level towards the mean of the weights currently assigned to it."""
        rows = self._rows(weight.detach()).to(self.codebook.dtype)
        codes = nearest_codes(rows, self.codebook)
        groups, levels = self.codebook.shape
        sums = torch.zeros(groups, levels, dtype=rows.dtype, device=rows.device).scatter_add_(1, codes, rows)
        counts = torch.zeros_like(sums).scatter_add_(1, codes, torch.ones_like(rows))
        means = sums / counts.clamp(min=1)
        movable = (counts > 0) & (self.codebook != 0)
        updated = torch.where(movable, self.ema_decay * self.codebook + (1 - self.ema_decay) * means, self.codebook)
        self.codebook.copy_(updated.sort(dim=1).values)
        self.num_updates += 1

    def _maybe_adapt(self, weight: torch.Tensor) -> None:
        if not (self.training and self.adapt and torch.is_grad_enabled()):
            return
        version = weight._version
        if version == self._last_version:
            return
        self._last_version = version
        self.num_steps += 1
        if int(self.num_steps) % self.update_interval == 0:
            self.ema_update(weight)

    def levels(self) -> torch.Tensor:
        return self.codebook

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self._rows(weight.detach()).to(self.codebook.dtype)
        return nearest_codes(rows, self.codebook).reshape(weight.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        groups = self.codebook.shape[0]
        flat = codes.reshape(groups, -1).long()
        book = self.codebook
        if groups == 1:
            return book[0][flat].reshape(codes.shape)
        return torch.gather(book, 1, flat).reshape(codes.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._maybe_adapt(weight)
        quantized = self.decode(self.encode(weight)).to(weight.dtype)
        return straight_through(quantized, weight)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, groups={self.codebook.shape[0]}, init={self.init}, "
            f"ema_decay={self.ema_decay}, adapt={self.adapt}"
        )
