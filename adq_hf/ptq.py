"""Post-training quantization onto each layer's own grid: RTN, GPTQ, OBQ and sensitivity-aware (SA).

Every method minimises a layer's output error ``||W X - Q X||^2`` given the Hessian
``H = 2/N X X^T`` of its calibration inputs, with every row of ``Q`` restricted to the levels of the
layer's weight quantizer (``levels()``: an ADQ codebook, POST's levels, an LSQ grid), so the result
is a regular adq_hf quantized model. Choices and measurements: docs/ptq.md.

* ``rtn``: nearest level, no compensation.
* ``obq``: Optimal Brain Quantization, faithful: every row greedily quantizes the weight whose
  quantization raises the error least, ``(w_j - q_j)^2 / [H^-1]_jj``, compensates the remaining
  weights of that row and downdates its own ``H^-1``. O(rows * cols^3); rows are processed in
  batches (same arithmetic as one row at a time).
* ``gptq``: one column order for all rows (``act_order``: descending ``diag H``), one Cholesky factor
  of ``H^-1`` shared by all rows, lazy block updates.
* ``sa``: sensitivity-aware: blocks of columns are quantized most-sensitive first, all rows in
  parallel with one shared inverse-Hessian update. Before each block the sensitivity of every
  remaining column is measured on the current (already compensated) weights, as the OBS loss
  increase of quantizing that column alone, summed over rows:
  ``s_j = sum_i (w_ij - q(w_ij))^2 / [H_R^-1]_jj`` (``H_R``: Hessian of the remaining columns);
  ``sensitivity="taylor"`` uses ``H_jj * sum_i (w_ij - q(w_ij))^2`` instead (no inverse).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transformers.pytorch_utils import Conv1D

from .blockwise import BlockInput, BlockPlan, Captured, capture_inputs, plan_blocks, run_model
from .config import PTQ_METHODS, ADQConfig
from .nn import QuantConv1D, QuantConv1d, QuantConv2d, QuantLinear, is_quantized_layer, output_major, quantized_layers
from .quantize import quantize_model
from .surgery import calibrate_activations

METHODS = PTQ_METHODS


# --------------------------------------------------------------------------------------------
# Grids: every weight has a sorted table of levels (per row, or per row and group of columns)
# --------------------------------------------------------------------------------------------
def nearest_level(values: torch.Tensor, table) -> torch.Tensor:
    """The nearest level of each row's table: ``values [R, K]``, ``table [R, L]`` sorted ascending (or
    a :class:`LevelGrid`, whose column groups then span ``values``' columns)."""
    if isinstance(table, LevelGrid):
        return table.nearest(values)
    idx = torch.searchsorted(table, values.contiguous()).clamp(1, table.shape[1] - 1)
    below, above = table.gather(1, idx - 1), table.gather(1, idx)
    return torch.where(values - below <= above - values, below, above)


def _nearest_per_column(values: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """``values [R, K]`` to the nearest level of their own table ``tables [R, K, L]``."""
    idx = torch.searchsorted(tables, values.unsqueeze(-1).contiguous()).clamp(1, tables.shape[2] - 1)
    below, above = tables.gather(2, idx - 1), tables.gather(2, idx)
    v = values.unsqueeze(-1)
    return torch.where(v - below <= above - v, below, above).squeeze(-1)


class LevelGrid:
    """The levels each weight of a ``[R, C]`` layer may take: ``tables [R, T, L]`` (float64, sorted),
    column ``j`` of row ``i`` rounding to ``tables[i, j // size]`` (``T = C / size`` column groups; ``T = 1``
    with ``size = C``: one table per row). With ``refit(t, weights [R, size], importance [size])`` the
    solvers call :meth:`prepare` before each block of columns, which re-fits every column group about
    to be quantized for the first time from its current (compensated) weights, through ``refit``
    (the quantizer's own fit; it returns the group's new ``[R, L]`` tables)."""

    def __init__(self, tables: torch.Tensor, size: int, refit: Optional[Callable] = None,
                 importance: Optional[torch.Tensor] = None):
        self.tables, self.size, self._refit, self._importance = tables, int(size), refit, importance
        self._fitted = torch.zeros(tables.shape[1], dtype=torch.bool)

    @property
    def groups(self) -> int:
        return self.tables.shape[1]

    def __getitem__(self, rows: slice) -> "LevelGrid":
        """The grid of a block of rows (no refit: OBQ works on row blocks)."""
        return LevelGrid(self.tables[rows], self.size)

    def nearest(self, values: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Nearest levels of ``values [R, K]``, whose columns are ``columns`` of the layer (default: all)."""
        if self.groups == 1:
            return nearest_level(values, self.tables[:, 0])
        if columns is None:
            columns = torch.arange(values.shape[1])
        return _nearest_per_column(values, self.tables[:, columns // self.size])

    def max_half_gap(self) -> torch.Tensor:
        """``[R, 1]``: half the largest gap between levels of a row's tables."""
        return ((self.tables[..., 1:] - self.tables[..., :-1]).amax(dim=(1, 2)) / 2).unsqueeze(1)

    def prepare(self, w: torch.Tensor, columns: torch.Tensor, upcoming: torch.Tensor) -> None:
        """Before quantizing layer columns ``upcoming``: re-fit the groups they open from ``w``, the current
        weights, whose column ``k`` is layer column ``columns[k]``."""
        if self._refit is None:
            return
        groups = torch.unique(upcoming // self.size)
        groups = groups[~self._fitted[groups]]
        if not len(groups):
            return
        # layer column -> its column in ``w`` (``w`` may hold only the columns not quantized yet: SA)
        position = torch.full((self.groups * self.size,), -1, dtype=torch.long)
        position[columns] = torch.arange(len(columns))
        for t in groups.tolist():
            cols = torch.arange(t * self.size, (t + 1) * self.size)
            importance = None if self._importance is None else self._importance[cols]
            self.tables[:, t] = torch.sort(self._refit(t, w[:, position[cols]], importance), dim=1).values
        self._fitted[groups] = True


def as_grid(tables) -> LevelGrid:
    """A :class:`LevelGrid` from ``[R, L]`` per-row tables (solvers accept both)."""
    return tables if isinstance(tables, LevelGrid) else LevelGrid(tables.unsqueeze(1), 1)


def row_tables(levels: torch.Tensor, rows: int, cols: Optional[int] = None, refit: Optional[Callable] = None,
               importance: Optional[torch.Tensor] = None) -> LevelGrid:
    """The :class:`LevelGrid` of a quantizer's ``[groups, L]`` levels for a ``[rows, cols]`` weight: 1 group,
    one per row, or ``rows * T`` groups of ``cols / T`` contiguous columns (group ``i * T + t``: row ``i``,
    columns ``[t * cols / T, (t + 1) * cols / T)``)."""
    table = levels.detach().to(torch.float64)
    groups = table.shape[0]
    if groups == 1:
        table = table.expand(rows, -1)
    if table.shape[0] == rows:
        return LevelGrid(torch.sort(table, dim=1).values.unsqueeze(1).contiguous(), cols or 1)
    if cols is None or groups % rows or cols % (groups // rows):
        raise ValueError(f"the quantizer has {groups} level groups for a {rows} x {cols} weight: PTQ needs per-tensor "
                         "levels, one group per row, or groups of contiguous columns within rows.")
    per_row = groups // rows
    tables = torch.sort(table, dim=1).values.reshape(rows, per_row, -1).contiguous()
    return LevelGrid(tables, cols // per_row, refit, importance)


# --------------------------------------------------------------------------------------------
# Hessians
# --------------------------------------------------------------------------------------------
def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Damped copy of ``H``: dead columns (no input ever) get ``H_jj = 1``, then ``damp * mean(diag)``
    is added to the diagonal, so the inverse exists."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got {list(hessian.shape)}.")
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean().item()
    diag += damp * (mean if mean > 0 else 1.0)
    return h


def inverse_hessian(h: torch.Tensor) -> torch.Tensor:
    """``H^-1`` of a damped Hessian (Cholesky; a clear error if it is still not positive definite)."""
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite: raise `damp` (e.g. 0.1) or give more "
                         "calibration data.")
    return torch.cholesky_inverse(factor)


def layer_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """Output reconstruction error ``tr((W - Q) H (W - Q)^T) / 2`` = mean squared error of ``W X`` per sample."""
    d = (w - q).to(torch.float64)
    return 0.5 * float(torch.einsum("ij,jk,ik->", d, hessian.to(torch.float64), d))


# --------------------------------------------------------------------------------------------
# Solvers: (W [R, C], damped H [C, C], tables [R, L]) -> Q [R, C] on the tables, all float64
# --------------------------------------------------------------------------------------------
def solve_rtn(w, h, tables, **_):
    return as_grid(tables).nearest(w)


def solve_obq(w, h, tables, max_bytes: int = 16 * 2**20, outliers: bool = True, **_):
    """Faithful OBQ: per-row greedy order, per-row inverse Hessian. Rows in batches of bounded memory.

    ``outliers=True`` (as the reference implementation): when compensation has pushed a remaining
    weight of a row so far that its rounding error exceeds every in-grid one (half the row's largest
    level gap), that weight is quantized next, before it drifts further; ``False``: OBQ's greedy
    definition only (least loss first).
    """
    rows, cols = w.shape
    tables = as_grid(tables)
    hinv_full = inverse_hessian(h)
    out = torch.empty_like(w)
    batch = max(1, min(rows, max_bytes // (8 * cols * cols)))
    for start in range(0, rows, batch):
        wb = w[start:start + batch].clone()
        tb = tables[start:start + batch]
        limit = tb.max_half_gap() ** 2 if tb.tables.shape[2] > 1 else None
        hinv = hinv_full.expand(wb.shape[0], cols, cols).clone()
        done = torch.zeros_like(wb, dtype=torch.bool)
        quantized = torch.empty_like(wb)
        r = torch.arange(wb.shape[0])
        for _ in range(cols):
            q = tb.nearest(wb)
            diag = hinv.diagonal(dim1=1, dim2=2)
            err = torch.where(done, torch.zeros_like(wb), (wb - q) ** 2)
            score = torch.where(done, torch.full_like(wb, math.inf), err / diag.clamp_min(1e-300))
            j = score.argmin(dim=1)
            if outliers and limit is not None:
                outside = (err > limit).any(dim=1)
                j = torch.where(outside, err.argmax(dim=1), j)
            wj, qj, dj = wb[r, j], q[r, j], diag[r, j]
            col = hinv[r, :, j]  # [B, C]
            wb -= ((wj - qj) / dj).unsqueeze(1) * col
            wb[r, j] = qj
            hinv.baddbmm_(col.unsqueeze(2), (col / dj.unsqueeze(1)).unsqueeze(1), alpha=-1.0)  # in place
            hinv[r, j, :] = 0.0  # exactly out of the problem (rounding would leave ~1e-17 there)
            hinv[r, :, j] = 0.0
            done[r, j] = True
            quantized[r, j] = qj
        out[start:start + batch] = quantized
    return out


def _gptq_sweep(wp, grid, upper, count, block_size, columns):
    """Quantize the first ``count`` columns of ``wp`` in place, in column order, compensating every
    later column: GPTQ's lazy block update. ``upper`` is the upper Cholesky factor of ``H^-1`` in
    the same column order (row i holds the update that follows quantizing column i); column ``k`` of
    ``wp`` is layer column ``columns[k]``. Column groups a block opens are re-fitted first
    (``LevelGrid.prepare``), from the weights as every earlier block left them."""
    for b0 in range(0, count, block_size):
        b1 = min(b0 + block_size, count)
        grid.prepare(wp, columns, columns[b0:b1])
        block = wp[:, b0:b1].clone()
        err = torch.zeros_like(block)
        for i in range(b1 - b0):
            q = grid.nearest(block[:, i:i + 1], columns[b0 + i:b0 + i + 1])
            e = (block[:, i:i + 1] - q) / upper[b0 + i, b0 + i]
            block[:, i:] -= e * upper[b0 + i, b0 + i:b1].unsqueeze(0)
            block[:, i:i + 1] = q
            err[:, i:i + 1] = e
        wp[:, b0:b1] = block
        wp[:, b1:] -= err @ upper[b0:b1, b1:]
    return wp


def _upper_factor(hinv):
    return torch.linalg.cholesky(hinv, upper=True)


def solve_gptq(w, h, tables, act_order: bool = True, block_size: int = 128, **_):
    cols = w.shape[1]
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    upper = _upper_factor(inverse_hessian(h[order][:, order]))
    w = w.clone()
    w[:, order] = _gptq_sweep(w[:, order], as_grid(tables), upper, cols, block_size, order)
    return w


def solve_sa(w, h, tables, block_size: int = 128, sensitivity: str = "obs", **_):
    """Sensitivity-aware: most sensitive block first, sensitivities re-measured before each block."""
    if sensitivity not in ("obs", "taylor"):
        raise ValueError(f"sensitivity must be 'obs' or 'taylor', got {sensitivity!r}.")
    w, tables = w.clone(), as_grid(tables)
    remaining = torch.arange(w.shape[1])
    while len(remaining):
        hinv = inverse_hessian(h[remaining][:, remaining])
        sub = w[:, remaining]
        err2 = ((sub - tables.nearest(sub, remaining)) ** 2).sum(dim=0)
        score = err2 / hinv.diagonal() if sensitivity == "obs" else err2 * h[remaining, remaining]
        ranked = torch.argsort(score, descending=True, stable=True)  # positions within `remaining`
        count = min(block_size, len(ranked))
        upper = _upper_factor(hinv[ranked][:, ranked])
        order = remaining[ranked]
        w[:, order] = _gptq_sweep(w[:, order], tables, upper, count, count, order)
        remaining = order[count:]
    return w


SOLVERS: Dict[str, Callable] = {"rtn": solve_rtn, "gptq": solve_gptq, "obq": solve_obq, "sa": solve_sa}


# --------------------------------------------------------------------------------------------
# Calibration inputs -> Hessians (forward hooks), sequential over layers
# --------------------------------------------------------------------------------------------
def _run(model: nn.Module, batch, device=None) -> None:
    run_model(model, batch, device)


def layer_input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X^T`` ([samples, cols]) the layer multiplies by its ``[rows, cols]`` weight (output
    channels first, ``adq_hf.nn.output_major``): Linear and transformers' Conv1D inputs flattened over
    tokens, convolution inputs unfolded (im2col, the order of ``weight.reshape(out, -1)``)."""
    if isinstance(layer, (nn.Linear, Conv1D)):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            raise ValueError("grouped convolutions are not supported by PTQ")
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("only zero padding given as numbers is supported by PTQ")
        if isinstance(layer, nn.Conv1d):  # a Conv2d of height 1
            x = x.unsqueeze(2)
            options = [((1,) + tuple(getattr(layer, k))) for k in ("kernel_size", "dilation", "padding", "stride")]
            options[2] = (0,) + tuple(layer.padding)
        else:
            options = [layer.kernel_size, layer.dilation, layer.padding, layer.stride]
        cols = F.unfold(x, options[0], dilation=options[1], padding=options[2], stride=options[3])
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValueError(f"{type(layer).__name__} is not a Linear, Conv1D, Conv1d or Conv2d layer")


def token_mask(batch) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` as booleans ([batch, tokens], True = a real token), if it has one:
    padding positions are not inputs the quantized model will see, so they stay out of the Hessian."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


def _supported(layer: nn.Module) -> bool:
    """Plain quantized Linear/Conv1D/Conv1d/Conv2d math (timm's forward-overriding convs transform the
    weight or pad dynamically, so the Hessian of the raw weight is not theirs)."""
    if not isinstance(layer, (QuantLinear, QuantConv1D, QuantConv1d, QuantConv2d)):
        return False
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.groups == 1 and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
    return True


class HessianHooks:
    """Forward pre-hooks adding each layer's inputs (after its input quantizer; padding tokens left out)
    to ``H = 2/N X X^T``. ``run(forward, mask)`` calls ``forward()`` and ends it (``Captured``) once
    every layer has been seen. Layers fed the same tensor without an input quantizer (q/k/v, gate/up)
    share one product ``X^T X`` per call. Products in float32, accumulated in float64."""

    def __init__(self, layers: List[nn.Module]):
        self.layers = list(layers)
        self.sums = {}
        self.counts = {id(layer): 0 for layer in self.layers}
        self.handles = []

    def __enter__(self) -> "HessianHooks":
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, module, args):
        x, mask = args[0], self.mask
        quantized = is_quantized_layer(module)  # B5's peers collect Hessians of plain layers
        key = (id(x), id(module) if quantized and module.input_quantizer is not None else None, _unfolding(module))
        _, product, rows = self.products.get(key, (None, None, 0))
        if product is None:
            q = module.quantize_input(x) if quantized else x
            if isinstance(module, (nn.Linear, Conv1D)) and mask is not None and q.dim() == 3 and q.shape[:2] == mask.shape:
                q = q[mask.to(q.device)]  # real tokens only
            flat = layer_input_rows(module, q).float()
            product, rows = flat.T @ flat, flat.shape[0]
            self.products[key] = (x, product, rows)  # x held: its id cannot be reused during this call
        if id(module) in self.sums:
            self.sums[id(module)].add_(product)
        else:
            self.sums[id(module)] = product.to(torch.float64)
        self.counts[id(module)] += rows
        self.seen.add(id(module))
        if len(self.seen) == len(self.layers):
            raise Captured

    def run(self, forward: Callable[[], object], mask: Optional[torch.Tensor] = None) -> None:
        self.seen, self.products, self.mask = set(), {}, mask
        try:
            forward()
        except Captured:
            pass
        finally:
            self.products = {}

    def hessian(self, layer: nn.Module) -> torch.Tensor:
        if self.counts[id(layer)] == 0:
            raise ValueError("the calibration data never reached layer "
                             f"{type(layer).__name__}: check that the batches are inputs of this model.")
        return self.sums[id(layer)] * (2.0 / self.counts[id(layer)])


def _unfolding(layer: nn.Module) -> tuple:
    """What, besides the input, ``layer_input_rows`` depends on."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return ()


@torch.no_grad()
def collect_hessian(model: nn.Module, layer: nn.Module, batches: List) -> torch.Tensor:
    """``H = 2/N X X^T`` (float64) of ``layer``'s inputs (after its input quantizer; a plain Linear or
    Conv2d, as B5's peers quantize, has none) over ``batches``, running the model only up to that
    layer; padding tokens (``attention_mask`` 0) are left out."""
    with HessianHooks([layer]) as hooks:
        for batch in batches:
            hooks.run(lambda: _run(model, batch), token_mask(batch))
    return hooks.hessian(layer)


@torch.no_grad()
def quantize_layer(layer: nn.Module, hessian: torch.Tensor, method: str = "sa", damp: float = 0.01,
                   refit: Optional[bool] = None, refine_levels: bool = False, **options) -> Dict[str, float]:
    """Replace ``layer``'s latent weight by a PTQ solution on its quantizer's levels; returns the
    reconstruction errors (this method's and RTN's, on the tables as they were) and the solver time.

    ``refit`` (tables per group of columns only): re-fit each column group's tables (ADQ: the group
    scales, or the group codebooks) from the compensated weights just before the solver quantizes its
    first column, weighted by ``diag(H)``; ``None``: wherever the quantizer can (docs/ptq.md).
    ``refine_levels``: then, codes fixed, move the codebook's levels to the least-squares ones for the
    layer's output error (ADQ codebooks per tensor, per channel or shared with group scales)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown PTQ method {method!r}; choose one of {list(METHODS)}.")
    weight = output_major(layer, layer.latent_weight())
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian {list(hessian.shape)} does not match the layer's {w.shape[1]} input columns.")
    quantizer = layer.weight_quantizer
    grouped = quantizer.levels().shape[0] not in (1, w.shape[0])
    fit = getattr(quantizer, "refit_column_group", None)
    if refit and grouped and fit is None:
        raise ValueError(f"refit=True: {type(quantizer).__name__} cannot re-fit its group tables; use refit=False.")
    refit_fn = None
    if grouped and fit is not None and refit is not False:
        per_row = quantizer.levels().shape[0] // w.shape[0]

        def refit_fn(t, block, importance):
            fit(t, per_row, block, importance)
            return quantizer.levels().detach().to(torch.float64).reshape(w.shape[0], per_row, -1)[:, t]

    tables = row_tables(quantizer.levels(), *w.shape, refit=refit_fn, importance=hessian.diagonal())
    rtn_error = layer_error(w, nearest_level(w, tables), hessian)
    h = prepare_hessian(hessian, damp)
    started = time.perf_counter()
    q = SOLVERS[method](w, h, tables, **options)
    seconds = time.perf_counter() - started
    q = nearest_level(q, tables)  # exactly on the levels (the solvers already are; guards rounding)
    if refine_levels:
        fit_levels = getattr(quantizer, "fit_levels_to_outputs", None)
        if fit_levels is None:
            raise ValueError(f"refine_levels=True: {type(quantizer).__name__} has no codebook levels to refine.")
        codes = quantizer.encode(q.reshape(weight.shape).to(weight.dtype))
        codes = fit_levels(w, codes, hessian)
        q = quantizer.decode(codes).reshape(w.shape).to(torch.float64)
    errors = {"error": layer_error(w, q, hessian), "rtn_error": rtn_error, "seconds": seconds}
    weight.copy_(q.reshape(weight.shape).to(weight.dtype))
    return errors


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable) -> int:
    """Recompute BatchNorm running statistics on ``batches`` (cumulative average, everything else in
    eval mode); returns how many BatchNorm layers were updated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            _run(model, batch, device)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


class PTQInterrupted(RuntimeError):
    """PTQ stopped (Ctrl-C) before every layer was quantized: the model is only partly PTQ'd."""


def quantize(
    model: nn.Module,
    calibration_data,
    config: Optional[ADQConfig] = None,
    method: str = "sa",
    damp: float = 0.01,
    bn_reestimate: bool = True,
    progress: bool = True,
    blockwise: bool = True,
    tokenizer=None,
    resume_dir: Optional[str] = None,
    **options,
) -> nn.Module:
    """One-shot post-training quantization (in place; returns the model).

    ``model``: a float model (quantized here with ``config``, mixed precision included when
    ``config.target_avg_bits`` is set) or one already quantized by adq_hf (``config=None``).
    ``calibration_data``: batches of model inputs (tensors, ``(inputs, labels)`` or dicts), a list of
    strings with ``tokenizer``, or a ``datasets.Dataset`` (``adq_hf.calibration.calibration_batches``).

    Layers are quantized one after another in forward order, each from inputs that already pass
    through the quantized layers before it. ``blockwise`` (default): block by block
    (``adq_hf.blockwise``: transformer layers, residual blocks), from cached block inputs, one pass
    through the model in total; within a block layers are quantized in forward order, those fed the
    same input together, and the block's outputs with its quantized weights feed the next block.
    Without repeated blocks (or ``blockwise=False``) the model runs up to each layer for its
    Hessian. BatchNorm statistics are re-estimated at the end.

    ``resume_dir``: after every block the quantized layers so far are saved there
    (``ptq_progress.safetensors``); a run with the same model, config, method, options and
    calibration data continues from the last finished block. An interrupted run (Ctrl-C) raises
    ``PTQInterrupted`` saying how far it got.
    ``options`` go to the solver (``block_size``, ``act_order`` for gptq, ``sensitivity`` for sa).
    The per-layer errors and times are in ``model.ptq_report``; how the run went through the model
    in ``model.ptq_plan``.
    """
    from .calibration import calibration_batches

    if method not in SOLVERS:
        raise ValueError(f"unknown PTQ method {method!r}; choose one of {list(METHODS)}.")
    if _is_empty(calibration_data):
        raise ValueError("calibration_data is empty: PTQ needs batches of model inputs (e.g. 1,024 training images).")
    batches = calibration_batches(calibration_data, tokenizer)
    was_training = model.training
    model.eval()
    run = _PTQRun(model, batches, method, damp, options, progress)
    try:
        run.prepare(config)
        run.quantize(blockwise, resume_dir)
        if bn_reestimate:
            reestimate_batchnorm(model, batches)
    finally:
        model.ptq_report, model.ptq_plan = run.report, run.plan_summary
        model.train(was_training)
    return model


def _is_empty(data) -> bool:
    try:
        return len(data) == 0
    except TypeError:  # an iterator: calibration_batches will say if it is empty
        return False


def quantize_at_load(model: nn.Module, config: ADQConfig, progress: bool = True) -> nn.Module:
    """Calibration at load (``ADQConfig.ptq``): block-by-block PTQ of a model just quantized from float
    weights, on ``config.calibration_dataset`` (text through ``config.tokenizer``, by default the
    checkpoint's own). The data and tokenizer references are dropped from the config afterwards."""
    if config.ptq is None:
        return model
    data = config.calibration_dataset
    if data is None:
        raise ValueError(f"ADQConfig.ptq={config.ptq!r} runs PTQ while loading float weights and needs "
                         "calibration_dataset= (batches, a list of strings or a datasets.Dataset).")
    tokenizer = config.tokenizer
    if tokenizer is None and _is_text(data):
        source = getattr(model, "name_or_path", None)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise ValueError(f"the calibration data is text and no tokenizer was given; loading one from {source!r} "
                             f"failed ({err}): pass ADQConfig(tokenizer=...).") from None
    quantize(model, data, config=None, method=config.ptq, tokenizer=tokenizer, progress=progress)
    config.calibration_dataset = config.tokenizer = None
    return model


def _is_text(data) -> bool:
    from .calibration import _is_dataset

    if _is_dataset(data):
        return "input_ids" not in data.column_names
    return isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], str)


class _PTQRun:
    """One PTQ run: the model, its calibration batches and the solver settings, layer by layer or block by block."""

    def __init__(self, model, batches, method, damp, options, progress):
        self.model, self.batches, self.method, self.damp, self.options = model, batches, method, damp, options
        self.progress = progress
        self.report: Dict[str, dict] = {}
        self.plan_summary: Dict[str, object] = {}

    def prepare(self, config) -> None:
        model, batches = self.model, self.batches
        with torch.no_grad():
            _run(model, batches[0])  # a clear error before any work if it does not fit
        if not any(is_quantized_layer(m) for m in model.modules()):
            if config is None:
                raise ValueError("the model is not quantized: pass an ADQConfig (or quantize_model it first).")
            quantize_model(model, config, calibration_data=batches)
        elif config is not None and config != getattr(model, "quantization_config", config):
            raise ValueError("the model is already quantized with another config; pass config=None to use its own.")
        self.layers = _forward_order(model, batches[0])
        calibrate_activations(model, batches)

    def solve_layer(self, name: str, layer: nn.Module, hessian: Callable[[], torch.Tensor]) -> None:
        """PTQ of one layer from ``hessian()``; layers whose Hessian is not their weight's stay at RTN."""
        if isinstance(layer, nn.Embedding):  # looked up, not multiplied (no input Hessian): its forward rounds to nearest
            return
        if not _supported(layer):
            warnings.warn(f"PTQ: {name} ({type(layer).__name__}) is left at round-to-nearest; its forward "
                          "transforms the weight or pads dynamically.", stacklevel=4)
            cols = output_major(layer, layer.latent_weight())[0].numel()
            self.report[name] = quantize_layer(layer, torch.eye(cols, dtype=torch.float64), "rtn")
        else:
            self.report[name] = quantize_layer(layer, hessian(), self.method, self.damp, **self.options)

    def quantize_layers_alone(self, layers, desc: str) -> None:
        """Each layer from a Hessian of the whole model run up to it (the path without blocks)."""
        from tqdm.auto import tqdm

        for name, layer in tqdm(layers, desc=desc, disable=not self.progress or not layers):
            self.solve_layer(name, layer, lambda layer=layer: collect_hessian(self.model, layer, self.batches))

    def quantize(self, blockwise: bool, resume_dir: Optional[str]) -> None:
        plan = plan_blocks(self.model, [m for _, m in self.layers], self.batches[0]) if blockwise else \
            BlockPlan(reason="blockwise=False")
        self.plan_summary = {"blockwise": bool(plan.blocks), "blocks": len(plan.blocks), "reason": plan.reason,
                             "shared_arguments": plan.shared_arguments if plan.blocks else None}
        if not plan.blocks:
            if resume_dir is not None:
                raise ValueError(f"resume_dir needs block-by-block PTQ, which this model cannot use: {plan.reason}.")
            self.quantize_layers_alone(self.layers, f"PTQ ({self.method})")
            return
        self.quantize_by_blocks(plan, resume_dir)

    def quantize_by_blocks(self, plan: BlockPlan, resume_dir: Optional[str]) -> None:
        from tqdm.auto import tqdm

        block_of = {id(m): i for i, (_, block) in enumerate(plan.blocks) for m in block.modules()}
        first = next(k for k, (_, layer) in enumerate(self.layers) if id(layer) in block_of)
        before = [(n, m) for n, m in self.layers[:first] if id(m) not in block_of]
        after = [(n, m) for n, m in self.layers[first:] if id(m) not in block_of]
        saved = _Progress(resume_dir, self) if resume_dir is not None else None
        start = saved.restore() if saved is not None else 0
        if start == 0:
            self.quantize_layers_alone(before, f"PTQ ({self.method}) before the blocks")
        inputs = capture_inputs(self.model, plan, self.batches, start, [token_mask(b) for b in self.batches])
        bar = tqdm(range(start, len(plan.blocks)), desc=f"PTQ ({self.method}) by block", disable=not self.progress)
        current = start
        try:
            for current in bar:
                name, block = plan.blocks[current]
                bar.set_postfix_str(name)
                layers = [(n, m) for n, m in self.layers if block_of.get(id(m)) == current]
                self.quantize_block(plan, current, layers, inputs)
                with torch.no_grad():
                    for item in inputs:
                        item.advance(plan, current)
                for _, layer in layers:
                    layer.clear_decoded_weight()  # the block is done: free its decoded weights
                if saved is not None:
                    saved.save(current + 1)
        except KeyboardInterrupt:
            done = f"{current} of {len(plan.blocks)} blocks are PTQ'd" if current else "no block is PTQ'd yet"
            hint = (f"run again with resume_dir={resume_dir!r} to continue from block {current + 1}" if saved is not None
                    else "pass resume_dir= to be able to continue an interrupted run")
            raise PTQInterrupted(f"PTQ ({self.method}) was interrupted in block {current + 1} ({plan.blocks[current][0]}): "
                                 f"{done}, the rest keep their round-to-nearest weights, so this is not a PTQ result; "
                                 f"{hint}.") from None
        self.quantize_layers_alone(after, f"PTQ ({self.method}) after the blocks")

    @torch.no_grad()
    def quantize_block(self, plan: BlockPlan, index: int, layers, inputs: List[BlockInput]) -> None:
        """Layers of one block in forward order; those fed the same tensor share one Hessian pass."""
        for group in _input_groups(plan, index, layers, inputs[0]):
            supported = [m for _, m in group if _supported(m)]
            with HessianHooks(supported) as hooks:
                if supported:
                    for item in inputs:
                        hooks.run(lambda item=item: item.run(plan, index), item.mask)
            for name, layer in group:
                self.solve_layer(name, layer, lambda layer=layer: hooks.hessian(layer))


@torch.no_grad()
def _input_groups(plan: BlockPlan, index: int, layers, item: BlockInput) -> List[List]:
    """``layers`` (forward order) in runs of consecutive layers fed the same input tensor.

    "The same" is object identity, decided while the block runs with the previous layer's input still
    held: a tensor freed after its layer (o_proj's input) leaves its Python object slot, and so its
    ``id``, to the next tensor made (the norm output feeding gate/up), so ids compared afterwards would
    group layers fed different tensors, and a Hessian would then be taken before the layer feeding it is
    quantized."""
    wanted = {id(m): (n, m) for n, m in layers}
    groups: List[List] = []
    placed = set()
    previous = [None]  # the last layer's input, held until the next layer's is compared with it

    def record(module, args):
        if id(module) in placed:
            return  # a layer called again: its first call places it
        placed.add(id(module))
        if groups and args[0] is previous[0]:
            groups[-1].append(wanted[id(module)])
        else:
            groups.append([wanted[id(module)]])
        previous[0] = args[0]

    handles = [layer.register_forward_pre_hook(record) for _, layer in layers]
    try:
        item.run(plan, index)
    finally:
        for handle in handles:
            handle.remove()
        previous[0] = None
    groups += [[wanted[i]] for i in wanted if i not in placed]  # not reached on this batch: alone, at the end
    return groups


class _Progress:
    """Block-by-block PTQ progress in ``directory/ptq_progress.safetensors``: the state of every quantized
    layer (latent weight and quantizer) after the last finished block, and a fingerprint of the run."""

    FILE = "ptq_progress.safetensors"

    def __init__(self, directory: str, run: "_PTQRun"):
        import hashlib
        import json
        import os

        self.path = os.path.join(directory, self.FILE)
        self.model = run.model
        os.makedirs(directory, exist_ok=True)
        digest = hashlib.sha256(json.dumps({
            "method": run.method, "damp": run.damp, "options": repr(sorted(run.options.items())),
            "config": getattr(self.model, "quantization_config", None) and self.model.quantization_config.to_dict(),
            "layers": [n for n, _ in run.layers]}, sort_keys=True).encode())
        for batch in run.batches:
            for tensor in _tensors(batch):
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.state_keys = [k for n, _ in run.layers for k in self.model.get_submodule(n).state_dict(prefix=n + ".")]

    def restore(self) -> int:
        """Load a matching earlier run's state; the number of blocks it finished (0: start afresh)."""
        import os

        from safetensors import safe_open

        if not os.path.isfile(self.path):
            return 0
        with safe_open(self.path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError(f"{self.path} belongs to another PTQ run (model, config, method, options or calibration "
                                 "data differ): delete it or pass another resume_dir.")
            state = {k: f.get_tensor(k) for k in f.keys()}
        self.model.load_state_dict(state, strict=False)
        return int(meta["blocks_done"])

    def save(self, blocks_done: int) -> None:
        import os

        from safetensors.torch import save_file

        state = self.model.state_dict()
        tensors = {k: state[k].detach().cpu().contiguous() for k in self.state_keys}
        tmp = self.path + ".tmp"
        save_file(tensors, tmp, metadata={"fingerprint": self.fingerprint, "blocks_done": str(blocks_done)})
        os.replace(tmp, self.path)


def _tensors(batch):
    if torch.is_tensor(batch):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)


@torch.no_grad()
def _forward_order(model: nn.Module, batch) -> List:
    """Quantized layers in the order a forward pass reaches them (registration order can differ)."""
    seen, handles = [], []
    for name, layer in quantized_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, m))))
    try:
        _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    order, names = [], set()
    for name, layer in seen:
        if name not in names:
            names.add(name)
            order.append((name, layer))
    rest = [(n, m) for n, m in quantized_layers(model) if n not in names]  # not reached: still rounded
    return order + rest
