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
  * Cost of the initialisation: one sort per row (numpy's SIMD sort on the CPU) and running sums;
    the quantiles are gathers, and each Lloyd iteration searches the ``2**bits - 1`` midpoints in the
    sorted row and takes each level's mean from the running sums (``SortedRows``): no Python loop
    over rows and no pass over the weights per iteration (docs/methods.md, "Initialisation cost").
  * EMA adaptation: nearest-level assignment, ``c <- m c + (1 - m) mean(assigned)``, zero fixed,
    empty levels unchanged, levels kept sorted. Updates are derived from the weights only, which
    DDP keeps identical on every rank (and FSDP all-gathers before the forward), so codebooks stay
    identical without communication. An update runs in a training forward when the weight's values
    have changed since the last one (an optimiser step happened: a fingerprint of sums differs),
    every ``update_interval`` such steps; gradient accumulation micro-steps therefore never update
    twice. Values rather than the tensor's version counter: FSDP hands the forward a fresh
    all-gathered tensor each time, and fused optimisers do not bump the counter.
    A frozen weight (``requires_grad`` False: the quantized base under PEFT/LoRA adapters) never
    updates its codebook.
  * Straight-through gradient to the float weight.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch

from .base import WeightQuantizer, register_weight_quantizer, straight_through, weight_groups


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU numpy's sort (SIMD, measured 15x faster than torch.sort on
    one thread for a 896 x 4864 float32 weight: docs/methods.md); elsewhere torch.sort."""
    if rows.device.type == "cpu" and rows.dtype == torch.float32 and not rows.requires_grad:
        return torch.from_numpy(np.sort(rows.numpy(), axis=1))
    return rows.sort(dim=1).values


def argsort_rows(rows: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts each row (numpy's argsort on the CPU, as :func:`sort_rows`)."""
    if rows.device.type == "cpu" and rows.dtype == torch.float32 and not rows.requires_grad:
        return torch.from_numpy(np.argsort(rows.numpy(), axis=1))
    return rows.sort(dim=1).indices


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """``[R, n + 1]`` running sums with a leading zero (float64), so a range's sum is one subtraction."""
    return torch.nn.functional.pad(values.cumsum(dim=1), (1, 0))


class SortedRows:
    """Each row sorted once, with running sums of (importance-weighted) counts, values and squares:
    the count, sum and squared error of any contiguous range of a row in O(1), so a Lloyd iteration
    is a ``searchsorted`` of the ``2**b - 1`` midpoints into the sorted row (``O(levels log n)`` per row)
    instead of a pass over every weight.

    ``importance`` (same shape as ``rows``, >= 0): per-weight weights of the squared error; ``None``
    weighs every weight 1. ``keep_order``: keep the sorting permutation, so :meth:`reweighted` can
    give the same sorted rows other weights without sorting again.
    """

    def __init__(self, rows: torch.Tensor, importance: Optional[torch.Tensor] = None, squares: bool = False,
                 keep_order: bool = False):
        if importance is None and not keep_order:
            self.values, self.order = sort_rows(rows), None
        else:
            self.order = argsort_rows(rows)
            self.values = rows.gather(1, self.order)
        self.length = rows.shape[1]
        self.squares = squares
        zero = torch.zeros(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        self.negatives = torch.searchsorted(self.values, zero).squeeze(1)  # weights < 0
        self.positives = self.length - torch.searchsorted(self.values, zero, right=True).squeeze(1)  # > 0
        self._weigh(importance)

    def _weigh(self, importance: Optional[torch.Tensor]) -> None:
        if importance is None:
            self._mass, weighted = None, self.values.to(torch.float64)
        else:
            w = importance.gather(1, self.order).to(torch.float64)
            self._mass, weighted = _prefix(w), w * self.values
        self._first = _prefix(weighted)
        self._second = _prefix(weighted * self.values) if self.squares else None

    def reweighted(self, importance: Optional[torch.Tensor]) -> "SortedRows":
        """The same sorted rows with other per-weight weights (needs ``keep_order``)."""
        if importance is not None and self.order is None:
            raise ValueError("SortedRows.reweighted needs the sorting order: build it with keep_order=True.")
        other = copy.copy(self)
        other._weigh(importance)
        return other

    def side_masses(self):
        """``(sum of |negative weights|, sum of positive weights)`` per row (unweighted)."""
        neg = -self.values.clamp(max=0).sum(dim=1, dtype=torch.float64)
        pos = self.values.clamp(min=0).sum(dim=1, dtype=torch.float64)
        return neg, pos

    def ranges(self, start: torch.Tensor, end: torch.Tensor):
        """``(mass, sum, sum of squares)`` of sorted positions ``[start, end)`` (any shape of index
        tensors with the rows as their first axis); sum of squares is None without ``squares``."""
        flat_start, flat_end = start.reshape(start.shape[0], -1), end.reshape(end.shape[0], -1)

        def diff(prefix):
            return (prefix.gather(1, flat_end) - prefix.gather(1, flat_start)).reshape(start.shape)

        mass = (end - start).to(torch.float64) if self._mass is None else diff(self._mass)
        second = None if self._second is None else diff(self._second)
        return mass, diff(self._first), second

    def assignment_edges(self, codebook: torch.Tensor) -> torch.Tensor:
        """``[R, L + 1]`` sorted positions where each level's weights start and end under nearest-level
        assignment (ties to the lower level, as ``nearest_codes``)."""
        midpoints = (codebook[:, 1:] + codebook[:, :-1]) / 2
        ends = torch.searchsorted(self.values, midpoints.contiguous(), right=True)
        rows = codebook.shape[0]
        return torch.cat([ends.new_zeros(rows, 1), ends, ends.new_full((rows, 1), self.length)], dim=1)

    def lloyd_step(self, codebook: torch.Tensor) -> torch.Tensor:
        """``move_levels(codebook, rows, 0)`` (weighted by the importance, if any) on the sorted rows."""
        edges = self.assignment_edges(codebook)
        mass, total, _ = self.ranges(edges[:, :-1], edges[:, 1:])
        means = (total / mass.clamp(min=torch.finfo(torch.float64).tiny)).to(codebook.dtype)
        movable = (mass > 0) & (codebook != 0)
        return torch.where(movable, means, codebook).sort(dim=1).values

    def lloyd(self, codebook: torch.Tensor, iters: int) -> torch.Tensor:
        """At most ``iters`` Lloyd steps; stops at the fixed point (every further step is the same)."""
        for _ in range(iters):
            moved = self.lloyd_step(codebook)
            if torch.equal(moved, codebook):
                break
            codebook = moved
        return codebook

    def error(self, codebook: torch.Tensor) -> torch.Tensor:
        """Per row, the (importance-weighted) squared error of nearest-level rounding (needs ``squares``)."""
        edges = self.assignment_edges(codebook)
        mass, total, second = self.ranges(edges[:, :-1], edges[:, 1:])
        c = codebook.to(torch.float64)
        return (second - 2 * c * total + c * c * mass).sum(dim=1)


def _side_counts(data: "SortedRows", num_nonzero: int):
    """Split ``num_nonzero`` levels between negative and positive sides, per row: the side with the
    larger total magnitude gets the odd one."""
    neg_mass, pos_mass = data.side_masses()
    small = num_nonzero // 2
    pos = torch.where(pos_mass >= neg_mass, num_nonzero - small, small)
    return num_nonzero - pos, pos


def _side_magnitudes(values: torch.Tensor, index: torch.Tensor, sign: torch.Tensor, negatives, positives):
    """The ``index``-th smallest magnitude (``[R, K]``) of the positive (``sign`` +1) or negative (-1)
    weights of each sorted row."""
    n = values.shape[1]
    pos_index = (n - positives).unsqueeze(1) + index
    neg_index = (negatives - 1).unsqueeze(1) - index
    where = torch.where(sign.unsqueeze(1) > 0, pos_index, neg_index).clamp(0, n - 1)
    return values.gather(1, where).abs()


def _quantile_magnitudes(data: SortedRows, sign, count, k, width, negatives, positives):
    """Per row, the ``k`` quantiles at ``(i - 0.5) / k`` of one side's magnitudes (``count`` of them),
    ``torch.quantile``'s linear interpolation; columns ``>= k`` are padding."""
    i = torch.arange(width, dtype=torch.float32, device=k.device).unsqueeze(0)
    probs = (i + 0.5) / k.unsqueeze(1).clamp(min=1)
    rank = (probs * (count.unsqueeze(1) - 1)).clamp(min=0)
    below, above = rank.long(), rank.ceil().long()
    low = _side_magnitudes(data.values, below, sign, negatives, positives)
    high = _side_magnitudes(data.values, above, sign, negatives, positives)
    return torch.lerp(low, high, rank - below)


def _uniform_magnitudes(data: SortedRows, sign, k, width, candidates: int = 64):
    """Per row, levels ``s, 2s, .., ks`` of one side, with the step ``s`` that minimises that side's
    squared rounding error among ``candidates`` steps up to the side's largest magnitude (the naive
    ``max / k`` rounds most weights of a 2-bit side to zero: docs/methods.md). The error of every
    candidate comes from range sums of the sorted row, not a pass over the weights."""
    x = data.values
    top = torch.where(sign > 0, x[:, -1], -x[:, 0])
    fractions = torch.linspace(1.0 / candidates, 1.0, candidates, dtype=x.dtype, device=x.device)
    steps = (top / k.clamp(min=1)).unsqueeze(1) * fractions  # [R, C]
    j = torch.arange(width + 1, dtype=x.dtype, device=x.device)  # code 0 (the zero level) .. width
    s = steps.unsqueeze(2)
    kk = k.view(-1, 1, 1)
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    lower = torch.where(j == 0, torch.zeros_like(s), (j - 0.5) * s)  # magnitudes rounding to code j
    upper = torch.where(j >= kk, inf, (j + 0.5) * s)
    lower = torch.where(j > kk, inf, lower)  # codes above k: empty
    shape = lower.shape
    positive = sign.view(-1, 1, 1) > 0
    flat = lambda t: t.reshape(shape[0], -1).contiguous()  # noqa: E731
    start = torch.where(positive, torch.searchsorted(x, flat(lower)).view(shape),
                        torch.searchsorted(x, flat(-upper), right=True).view(shape))
    end = torch.where(positive, torch.searchsorted(x, flat(upper)).view(shape),
                      torch.searchsorted(x, flat(-lower), right=True).view(shape))
    end = torch.maximum(start, end)
    mass, total, second = data.ranges(start, end)
    centre = (sign.view(-1, 1, 1) * j * s).to(torch.float64)
    errors = (second - 2 * centre * total + centre * centre * mass).sum(dim=2)  # [R, C]
    best = steps.gather(1, errors.argmin(dim=1, keepdim=True))
    return best * torch.arange(1, width + 1, dtype=x.dtype, device=x.device)


def _initial_levels(data: SortedRows, bits: int, init: str) -> torch.Tensor:
    """The unrefined codebook ``[R, 2**bits]`` of sorted rows: ``init`` levels per side, one exact zero."""
    x = data.values
    num_levels = 2**bits
    neg_k, pos_k = _side_counts(data, num_levels - 1)
    negatives, positives = data.negatives, data.positives
    width = int(max(neg_k.max(), pos_k.max()))
    one = torch.ones_like(neg_k)

    def side(k, own_sign, own_count, other_count):
        # a side with no weights mirrors the other side's magnitudes; an all-zero row gets tiny levels
        sign = torch.where(own_count > 0, own_sign * one, -own_sign * one)
        count = torch.where(own_count > 0, own_count, other_count)
        if init == "quantile":
            mags = _quantile_magnitudes(data, sign, count, k, width, negatives, positives)
        else:
            mags = _uniform_magnitudes(data, sign, k, width)
        tiny = torch.arange(1, width + 1, dtype=x.dtype, device=x.device) * 1e-8
        return torch.where((count > 0).unsqueeze(1), mags, tiny.expand_as(mags))

    neg = side(neg_k, -1, negatives, positives)
    pos = side(pos_k, 1, positives, negatives)
    slot = torch.arange(num_levels, device=x.device).unsqueeze(0)
    nk = neg_k.unsqueeze(1)
    neg_values = -neg.gather(1, (nk - 1 - slot).clamp(0, width - 1))
    pos_values = pos.gather(1, (slot - nk - 1).clamp(0, width - 1))
    return torch.where(slot < nk, neg_values, torch.where(slot == nk, torch.zeros_like(pos_values), pos_values))


def refined_codebook(data: SortedRows, bits: int, init: str, iters: int) -> torch.Tensor:
    """``init``'s levels refined by at most ``iters`` Lloyd steps. For ``"quantile"`` with ``iters > 0``
    the steps also run from the uniform seed (best-MSE step) and each row keeps the fit with the lower
    squared error: from quantile seeds (level density ~ pdf, where the MSE optimum at high rates is
    ~ pdf**(1/3)) Lloyd converges slowly once there are many levels; at 8 bits 30 steps left 1.8x the
    error of a uniform grid (docs/methods.md, "8-bit weights"). At 2 bits both reach the same levels.
    ``data`` needs ``squares`` (the error) when both seeds run. (The shared codebook of scaled group
    tables keeps its quantile seed: it gets >= ``SHARED_CODEBOOK_ITERS`` steps.)"""
    book = data.lloyd(_initial_levels(data, bits, init), iters)
    if init != "quantile" or iters == 0:
        return book
    other = data.lloyd(_initial_levels(data, bits, "uniform"), iters)
    return torch.where((data.error(other) < data.error(book)).unsqueeze(1), other, book)


# Rows are initialised in chunks of at most this many weights (bounds the sorted copy and its sums).
INIT_CHUNK_ELEMENTS = 1 << 23


def initial_codebook(weight_rows: torch.Tensor, bits: int, init: str = "quantile", iters: int = 0,
                     importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codebook ``[rows, 2**bits]`` (ascending, one exact zero per row) for ``weight_rows [rows, n]``,
    refined by ``iters`` Lloyd iterations (``move_levels`` with decay 0). With ``importance`` (a
    non-negative tensor like ``weight_rows``) up to ``iters`` more, weighted by it, start from that
    plain fit, so the weighted error is never above the plain fit's (Lloyd steps cannot raise it; from
    the quantiles directly they can end in a worse local optimum: measured on MiniLM, docs/methods.md).
    One sort per row; the iterations run on the sorted rows (:class:`SortedRows`) and stop early
    once the levels no longer move."""
    rows = weight_rows.detach().to(torch.float32)
    if importance is not None:
        importance = importance.detach().to(torch.float32).reshape(rows.shape)
    per_chunk = max(1, INIT_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    books = []
    for start in range(0, rows.shape[0], per_chunk):
        chunk = rows[start:start + per_chunk]
        weights = None if importance is None else importance[start:start + per_chunk]
        data = SortedRows(chunk, squares=init == "uniform" or iters > 0, keep_order=weights is not None)
        book = refined_codebook(data, bits, init, iters)
        if weights is not None:  # from the plain fit on: Lloyd steps never raise the weighted error
            book = data.reweighted(weights).lloyd(book, iters)
        books.append(book)
    return torch.cat(books)


SCALE_DTYPE = torch.float16  # per-group scales are stored (and used) at this precision
# A codebook shared by all groups of a tensor is one long row: its Lloyd steps are cheap, and 30 are
# far from converged there (docs/methods.md), so it gets at least this many (unless 0: the raw init).
SHARED_CODEBOOK_ITERS = 100
REFIT_SCALE_STEPS = 3  # least-squares steps when PTQ re-fits a group's scale


def fit_scaled_codebook(rows: torch.Tensor, bits: int, init: str = "quantile", iters: int = 30,
                        importance: Optional[torch.Tensor] = None, rounds: int = 1):
    """One codebook ``[1, 2**bits]`` shared by every row of ``rows [groups, G]``, times a scale per row
    (``[groups, 1]``, ``SCALE_DTYPE``): the table of group ``g`` is ``scale[g] * codebook``.

    Alternating minimisation of the (importance-weighted) squared error, starting from the rows'
    absolute maxima as scales: the codebook is fitted (quantiles, then at most ``iters`` Lloyd steps) to
    the pooled normalised weights ``w / s``, weighted by ``s**2`` (the error of ``w`` is ``s**2`` times
    that of ``w / s``); then, ``rounds`` times, each scale becomes the least-squares one for the levels
    its weights round to and the codebook is refitted. Scales are rounded to ``SCALE_DTYPE`` before
    every fit, so the codebook is fitted to the scales that are stored."""
    rows = rows.detach().to(torch.float32)
    weights = None if importance is None else importance.detach().to(torch.float32).reshape(rows.shape)
    scale = _representable_scales(rows.abs().amax(dim=1, keepdim=True))
    book = None
    for round_ in range(rounds + 1):
        live = scale > 0
        safe = torch.where(live, scale, torch.ones_like(scale))
        norm_weights = (safe * safe * live).expand_as(rows)
        data = SortedRows((rows / safe).reshape(1, -1), norm_weights.reshape(1, -1), squares=init == "uniform",
                          keep_order=True)
        if book is None:  # the plain fit first; weighted steps from it (as initial_codebook)
            book = data.lloyd(_initial_levels(data, bits, init), iters)
        if weights is not None:
            data = data.reweighted((weights * norm_weights).reshape(1, -1))
        book = data.lloyd(book, iters)
        if round_ < rounds:
            scale = _representable_scales(_least_squares_scale(rows, weights, book, safe) * live)
    return book, scale.to(SCALE_DTYPE)


def _least_squares_scale(rows, weights, book, scale):
    """Per row, the scale minimising ``sum weights (w - s c_k)**2`` for the levels ``c_k`` the row's
    normalised weights ``w / scale`` round to."""
    midpoints = (book[0, 1:] + book[0, :-1]) / 2
    levels = book[0][torch.bucketize(rows / scale, midpoints)]
    weighted = levels if weights is None else weights * levels
    num = (weighted * rows).sum(dim=1, keepdim=True)
    den = (weighted * levels).sum(dim=1, keepdim=True)
    return torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), scale)


def _representable_scales(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to ``SCALE_DTYPE`` (float32 again); a clear error if one does not fit."""
    top = torch.finfo(SCALE_DTYPE).max
    if bool((scale > top).any()):
        raise ValueError(f"a weight group's scale {float(scale.max()):.3g} exceeds {SCALE_DTYPE}'s range ({top:.0f}): "
                         "use granularity='per_channel' or 'per_tensor' for this model.")
    return scale.to(SCALE_DTYPE).to(torch.float32)


def move_levels(codebook: torch.Tensor, rows: torch.Tensor, decay: float,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``c <- decay c + (1 - decay) mean(weights nearest to c)`` for every non-zero level that has
    weights (zero and empty levels stay), re-sorted: the EMA update, and with ``decay=0`` one Lloyd
    iteration. ``weights`` (like ``rows``): a weighted mean instead."""
    codes = nearest_codes(rows, codebook)
    if weights is None:
        sums = torch.zeros_like(codebook).scatter_add_(1, codes, rows)
        counts = torch.zeros_like(codebook).scatter_add_(1, codes, torch.ones_like(rows))
    else:
        sums = torch.zeros_like(codebook).scatter_add_(1, codes, weights * rows)
        counts = torch.zeros_like(codebook).scatter_add_(1, codes, weights)
    means = sums / torch.where(counts > 0, counts, torch.ones_like(counts))
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
    """Non-uniform codebook quantizer (ADQ).

    The row-major flattened weight is split into ``num_groups`` contiguous groups (1: per tensor; the
    output channels: per channel; ``rows * cols / G``: per group of ``G`` columns). Each group's table
    (``levels()``, ``[num_groups, 2**bits]``) is its own codebook row, or, with ``group_scales``, one
    codebook shared by the tensor times the group's scale (``scale [num_groups, 1]``, float16): the
    same table layout for packing, deploy and ONNX, at a fraction of the bytes (docs/methods.md).
    """

    stored_dtypes = {"scale": SCALE_DTYPE}

    def __init__(
        self,
        bits: int,
        num_groups: int = 1,
        init: str = "quantile",
        ema_decay: float = 0.99,
        update_interval: int = 1,
        adapt: bool = True,
        init_iters: int = 30,
        group_scales: bool = False,
    ):
        super().__init__(bits)
        self.init = init
        self.init_iters = int(init_iters)
        self.ema_decay = float(ema_decay)
        self.update_interval = int(update_interval)
        self.adapt = bool(adapt)
        self.register_buffer("codebook", torch.zeros(1 if group_scales else num_groups, 2**bits))
        self.register_buffer("scale", torch.ones(num_groups, 1, dtype=SCALE_DTYPE) if group_scales else None)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # optimiser steps seen (saved, so a resumed run keeps the update_interval phase)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # fingerprint of the weight values at the last update; None after a load: the checkpoint was
        # taken right after an optimiser step, so the first training forward counts as a new step
        self._last_seen: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, config, bits: int, weight_shape) -> "CodebookWeightQuantizer":
        groups = weight_groups(config, weight_shape)
        return cls(
            bits,
            num_groups=groups,
            init=config.codebook_init,
            ema_decay=config.ema_decay,
            update_interval=config.ema_update_interval,
            adapt=config.codebook_update == "ema",
            init_iters=config.codebook_init_iters,
            group_scales=config.granularity == "per_group" and config.group_tables == "scaled",
        )

    @property
    def num_groups(self) -> int:
        return self.codebook.shape[0] if self.scale is None else self.scale.shape[0]

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.num_groups, -1)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, importance: Optional[torch.Tensor] = None) -> None:
        """Fit the tables to ``weight``; ``importance`` (non-negative, like ``weight``) weighs each
        weight's squared error in the fit (sensitivity-weighted codebooks)."""
        rows = self._rows(weight.detach()).to(torch.float32)
        if importance is not None:
            importance = self._rows(importance.detach()).to(torch.float32)
        if self.scale is None:
            book = initial_codebook(rows, self.bits, self.init, self.init_iters, importance)
        else:
            iters = max(self.init_iters, SHARED_CODEBOOK_ITERS) if self.init_iters else 0
            book, scale = fit_scaled_codebook(rows, self.bits, self.init, iters, importance)
            self.scale.copy_(scale)
        self.codebook.copy_(book.to(self.codebook))
        self.num_updates.zero_()  # buffers may hold garbage (transformers creates missing keys empty)
        self.num_steps.zero_()
        self._last_seen = weight_fingerprint(weight)

    @torch.no_grad()
    def refit_column_group(self, t: int, per_row: int, weights: torch.Tensor,
                           importance: Optional[torch.Tensor] = None) -> None:
        """Re-fit the tables of column group ``t`` of every row (groups ``i * per_row + t``) to
        ``weights [rows, G]`` (PTQ calls this with the compensated weights before quantizing the
        group), each weight's error weighted by ``importance [G]`` (the Hessian's diagonal there):
        with group scales, the scales (least squares on the shared codebook); otherwise the groups'
        own codebooks."""
        weights = weights.to(torch.float32)
        index = torch.arange(weights.shape[0], device=weights.device) * per_row + t
        imp = None if importance is None else importance.to(torch.float32).expand_as(weights)
        if self.scale is None:
            book = initial_codebook(weights, self.bits, self.init, self.init_iters, imp)
            self.codebook[index] = book.to(self.codebook)
            return
        top = weights.abs().amax(dim=1, keepdim=True)
        scale = self.scale[index].to(torch.float32)
        scale = torch.where(scale > 0, scale, top)
        live = top > 0
        safe = torch.where(live, scale, torch.ones_like(scale))
        for _ in range(REFIT_SCALE_STEPS):
            safe = _least_squares_scale(weights, imp, self.codebook, safe)
        self.scale[index] = _representable_scales(safe * live).to(SCALE_DTYPE)

    @torch.no_grad()
    def fit_levels_to_outputs(self, weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor,
                              max_elements: int = 1 << 22) -> torch.Tensor:
        """Least-squares levels for fixed ``codes``: the non-zero levels minimising the layer's output
        error ``tr((W - Q) H (W - Q)^T)`` (``W``: ``weight`` as ``[rows, cols]``, ``H``: ``hessian``), one
        ``(L-1) x (L-1)`` linear system per codebook row (a shared codebook: one system for all rows,
        each weight entering with its group's scale). Zero stays exact, a level no weight uses keeps
        its value; levels are re-sorted. Returns ``codes`` for the re-sorted levels (decode them).
        PTQ calls it after its solver (``refine_levels``)."""
        rows, original_shape = weight.shape[0], codes.shape
        w = weight.reshape(rows, -1).to(torch.float64)
        h = hessian.to(torch.float64)
        codes = codes.reshape(rows, -1)
        L = self.codebook.shape[1]
        if self.scale is not None:
            per_weight = self.scale.to(torch.float64).reshape(rows, -1)  # one scale per group of G columns
            multiplier = per_weight.repeat_interleave(w.shape[1] // per_weight.shape[1], dim=1)
        else:
            multiplier = torch.ones_like(w)
        shared = self.codebook.shape[0] == 1
        if not shared and self.codebook.shape[0] != rows:
            raise ValueError("fit_levels_to_outputs needs one codebook per tensor or per output channel.")
        gram = torch.zeros(1 if shared else rows, L, L, dtype=torch.float64)
        target = torch.zeros(1 if shared else rows, L, dtype=torch.float64)
        step = max(1, max_elements // (w.shape[1] * L))
        for start in range(0, rows, step):
            m = torch.nn.functional.one_hot(codes[start:start + step], L).to(torch.float64)
            m = m * multiplier[start:start + step].unsqueeze(-1)  # [r, C, L]: Q = sum_k c_k M[..., k]
            hm = torch.einsum("cd,rdl->rcl", h, m)
            g = torch.einsum("rck,rcl->rkl", m, hm)
            b = torch.einsum("rck,rc->rk", hm, w[start:start + step])
            if shared:
                gram[0] += g.sum(dim=0)
                target[0] += b.sum(dim=0)
            else:
                gram[start:start + step], target[start:start + step] = g, b
        book = self.codebook.to(torch.float64)
        movable = book != 0
        used = gram.diagonal(dim1=1, dim2=2) > 0
        solve = movable & used
        # (G + lambda I) c = b + lambda c_old on the levels that move: unused/zero levels stay exactly
        ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        new = book.clone()
        for t in range(book.shape[0]):
            idx = solve[t].nonzero().squeeze(1)
            if not len(idx):
                continue
            fixed = (~solve[t]).nonzero().squeeze(1)
            lhs = gram[t][idx][:, idx] + ridge[t] * torch.eye(len(idx), dtype=torch.float64)
            rhs = target[t][idx] - gram[t][idx][:, fixed] @ book[t][fixed] + ridge[t] * book[t][idx]
            new[t, idx] = torch.linalg.solve(lhs, rhs)
        order = torch.argsort(new, dim=1)
        self.codebook.copy_(new.gather(1, order).to(self.codebook))
        position = torch.argsort(order, dim=1)  # old level index -> its index in the sorted levels
        table = position.expand(rows, -1) if shared else position
        return table.gather(1, codes).reshape(original_shape)

    def _normalised(self, rows: torch.Tensor):
        """``(rows / scale, scale**2)`` with the scale of every group (1 for an all-zero group)."""
        scale = self.scale.to(rows.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return rows / scale, (scale * scale).expand_as(rows)

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor) -> None:
        """One EMA step of every level towards the mean of the weights currently assigned to it
        (with group scales: of the normalised weights ``w / s``, weighted by ``s**2``)."""
        rows = self._rows(weight.detach()).to(self.codebook.dtype)
        if self.scale is None:
            self.codebook.copy_(move_levels(self.codebook, rows, self.ema_decay))
        else:
            normalised, weights = self._normalised(rows)
            self.codebook.copy_(move_levels(self.codebook, normalised.reshape(1, -1), self.ema_decay,
                                            weights.reshape(1, -1)))
        self.num_updates += 1

    @torch.compiler.disable  # host synchronisation: runs outside torch.compile's graph
    def _maybe_adapt(self, weight: torch.Tensor) -> None:
        # a frozen weight (requires_grad False: a PEFT/LoRA base, a frozen layer) is never stepped: no update
        if not (self.training and self.adapt and torch.is_grad_enabled() and weight.requires_grad):
            return
        seen = weight_fingerprint(weight)
        if self._last_seen is not None and torch.equal(seen, self._last_seen.to(seen.device)):
            return
        self._last_seen = seen
        self.num_steps += 1
        if int(self.num_steps) % self.update_interval == 0:
            self.ema_update(weight)

    def levels(self) -> torch.Tensor:
        if self.scale is None:
            return self.codebook
        return self.codebook * self.scale.to(self.codebook.dtype)

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self._rows(weight.detach()).to(self.codebook.dtype)
        if self.scale is None:
            return nearest_codes(rows, self.codebook).reshape(weight.shape)
        # one shared codebook: search the normalised weights in its midpoints (one 1-D search table)
        book = self.codebook[0]
        midpoints = (book[1:] + book[:-1]) / 2
        return torch.bucketize(self._normalised(rows)[0], midpoints).reshape(weight.shape)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        groups = self.num_groups
        flat = codes.reshape(groups, -1).long()
        book = self.levels()
        if groups == 1:
            return book[0][flat].reshape(codes.shape)
        return torch.gather(book, 1, flat).reshape(codes.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._maybe_adapt(weight)
        quantized = self.decode(self.encode(weight)).to(weight.dtype)
        return straight_through(quantized, weight)

    def extra_repr(self) -> str:
        scales = ", group scales" if self.scale is not None else ""
        return (
            f"bits={self.bits}, groups={self.num_groups}{scales}, init={self.init}, init_iters={self.init_iters}, "
            f"ema_decay={self.ema_decay}, adapt={self.adapt}"
        )
