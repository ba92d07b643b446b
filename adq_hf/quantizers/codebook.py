"""ADQ weight quantizer: a codebook with an exact zero, initialised from weight quantiles and
adapted online by an exponential moving average of the weights assigned to each level.

Design choices (docs/methods.md has the reasons and measurements):
  * ``2**bits`` levels: one exact zero, ``2**bits - 1`` non-zero levels split between the negative
    and positive side; the side with the larger total magnitude gets the odd level (as NF4 does,
    but chosen from the data instead of always positive), so no code is wasted.
  * Quantile initialisation: the ``k`` levels of a side are that side's quantiles at
    ``(i - 0.5) / k``, the centres of ``k`` equal-mass bins. A side with no weights mirrors the other.
  * Refinement: ``init_iters`` Lloyd iterations (the EMA update with ``m = 0``) move the initial
    levels to the fixed point the EMA update converges to. Without it, at 2 bits the codebook
    drifts ~40% outwards during training (quantiles sit inside the cluster means) and the weights
    chase it: -8.8 points on the Fashion-MNIST ResNet-20 W2A2 screen (docs/methods.md).
  * EMA adaptation: nearest-level assignment, ``c <- m c + (1 - m) mean(assigned)``, zero fixed,
    empty levels unchanged, levels kept sorted. Updates are derived from the weights only, which
    DDP keeps identical on every rank (and FSDP all-gathers before the forward), so codebooks stay
    identical without communication. An update runs in a training forward when the weight's values
    have changed since the last one (an optimiser step happened: a fingerprint of sums differs),
    every ``update_interval`` such steps; gradient accumulation micro-steps therefore never update
    twice. Values rather than the tensor's version counter: FSDP hands the forward a fresh
    all-gathered tensor each time, and fused optimisers do not bump the counter.
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
    # "uniform" (the ablation of quantile init): levels step * (1..k), the step that minimises this
    # side's squared rounding error among 64 candidates up to the largest magnitude; the naive
    # range max / k rounds most weights of a 2-bit side to zero (docs/methods.md)
    return _best_uniform_step(magnitudes, k) * torch.arange(1, k + 1, dtype=magnitudes.dtype, device=magnitudes.device)


def _best_uniform_step(magnitudes: torch.Tensor, k: int, candidates: int = 64) -> torch.Tensor:
    steps = magnitudes.max() / k * torch.linspace(1.0 / candidates, 1.0, candidates, dtype=magnitudes.dtype,
                                                  device=magnitudes.device)
    codes = torch.round(magnitudes[None, :] / steps[:, None]).clamp(max=k)  # [candidates, n], 0 = zero level
    errors = ((codes * steps[:, None] - magnitudes[None, :]) ** 2).sum(dim=1)
    return steps[errors.argmin()]


def initial_codebook(weight_rows: torch.Tensor, bits: int, init: str = "quantile", iters: int = 0) -> torch.Tensor:
    """Codebook ``[rows, 2**bits]`` (ascending, one exact zero per row) for ``weight_rows [rows, n]``,
    refined by ``iters`` Lloyd iterations (``move_levels`` with decay 0)."""
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
    book = torch.stack(books)
    for _ in range(iters):
        book = move_levels(book, rows, 0.0)
    return book


def move_levels(codebook: torch.Tensor, rows: torch.Tensor, decay: float) -> torch.Tensor:
    """``c <- decay c + (1 - decay) mean(weights nearest to c)`` for every non-zero level that has
    weights (zero and empty levels stay), re-sorted: the EMA update, and with ``decay=0`` one Lloyd
    iteration."""
    codes = nearest_codes(rows, codebook)
    sums = torch.zeros_like(codebook).scatter_add_(1, codes, rows)
    counts = torch.zeros_like(codebook).scatter_add_(1, codes, torch.ones_like(rows))
    means = sums / counts.clamp(min=1)
    movable = (counts > 0) & (codebook != 0)
    return torch.where(movable, decay * codebook + (1 - decay) * means, codebook).sort(dim=1).values


def nearest_codes(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of each row's (sorted) codebook; ties go to the lower level.

    Up to 16 levels it counts the midpoints below each weight, one comparison pass per midpoint:
    on the CPU ``searchsorted`` costs ~60 ns per weight, 10-20x more than 3-15 comparisons
    (docs/methods.md, "Training cost"); same codes."""
    midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2
    if midpoints.shape[1] > MAX_COMPARED_MIDPOINTS or rows.dtype != midpoints.dtype:
        return torch.searchsorted(midpoints.contiguous(), rows.contiguous())
    count = torch.zeros_like(rows)
    above = torch.empty_like(rows)
    for k in range(midpoints.shape[1]):
        count.add_(torch.gt(rows, midpoints[:, k : k + 1], out=above))
    return count.long()


MAX_COMPARED_MIDPOINTS = 15


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Sum and norm (accumulated in float64), smallest and largest value: equal for unchanged
    values, and an optimiser step that moves any weight changes them (a few reductions, no copy)."""
    w = weight.detach()
    low, high = torch.aminmax(w)
    return torch.stack([w.sum(dtype=torch.float64), torch.linalg.vector_norm(w, dtype=torch.float64),
                        low.double(), high.double()])


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
        init_iters: int = 30,
    ):
        super().__init__(bits)
        self.init = init
        self.init_iters = int(init_iters)
        self.ema_decay = float(ema_decay)
        self.update_interval = int(update_interval)
        self.adapt = bool(adapt)
        self.register_buffer("codebook", torch.zeros(num_groups, 2**bits))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # optimiser steps seen (saved, so a resumed run keeps the update_interval phase)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # fingerprint of the weight values at the last update; None after a load: the checkpoint was
        # taken right after an optimiser step, so the first training forward counts as a new step
        self._last_seen: Optional[torch.Tensor] = None

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
            init_iters=config.codebook_init_iters,
        )

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.codebook.shape[0], -1)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        rows = self._rows(weight.detach()).to(torch.float32)
        self.codebook.copy_(initial_codebook(rows, self.bits, self.init, self.init_iters).to(self.codebook))
        self.num_updates.zero_()  # buffers may hold garbage (transformers creates missing keys empty)
        self.num_steps.zero_()
        self._last_seen = weight_fingerprint(weight)

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor) -> None:
        """One EMA step of every level towards the mean of the weights currently assigned to it."""
        rows = self._rows(weight.detach()).to(self.codebook.dtype)
        self.codebook.copy_(move_levels(self.codebook, rows, self.ema_decay))
        self.num_updates += 1

    @torch.compiler.disable  # host synchronisation: runs outside torch.compile's graph
    def _maybe_adapt(self, weight: torch.Tensor) -> None:
        if not (self.training and self.adapt and torch.is_grad_enabled()):
            return
        seen = weight_fingerprint(weight)
        if self._last_seen is not None and torch.equal(seen, self._last_seen.to(seen.device)):
            return
        self._last_seen = seen
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
            f"bits={self.bits}, groups={self.codebook.shape[0]}, init={self.init}, init_iters={self.init_iters}, "
            f"ema_decay={self.ema_decay}, adapt={self.adapt}"
        )
