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

from .config import ADQConfig
from .nn import QuantConv2d, QuantLinear, is_quantized_layer, quantized_layers
from .quantize import quantize_model
from .surgery import calibrate_activations, model_inputs

METHODS = ("rtn", "gptq", "obq", "sa")


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
def _run(model: nn.Module, batch, device) -> None:
    args, kwargs = model_inputs(batch)
    try:
        model(*(a.to(device) if torch.is_tensor(a) else a for a in args),
              **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()})
    except RuntimeError as err:  # shape/dtype errors from the model itself
        raise ValueError(f"a calibration batch does not fit the model ({err}); pass batches of this "
                         "model's inputs.") from None


class _Captured(Exception):
    """Raised by the capture hook to end a forward pass once the layer's input is seen."""


def layer_input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X^T`` ([samples, cols]) the layer multiplies by its ``[rows, cols]`` weight: Linear
    inputs flattened over tokens, convolution inputs unfolded (im2col, the order of
    ``weight.reshape(out, -1)``)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError("grouped convolutions are not supported by PTQ")
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("only zero padding given as numbers is supported by PTQ")
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValueError(f"{type(layer).__name__} is not a Linear/Conv2d layer")


def token_mask(batch) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` as booleans ([batch, tokens], True = a real token), if it has one:
    padding positions are not inputs the quantized model will see, so they stay out of the Hessian."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


def _supported(layer: nn.Module) -> bool:
    """Plain quantized Linear/Conv2d math (timm's forward-overriding convs transform the weight or
    pad dynamically, so the Hessian of the raw weight is not theirs)."""
    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
    return True


@torch.no_grad()
def collect_hessian(model: nn.Module, layer: nn.Module, batches: List) -> torch.Tensor:
    """``H = 2/N X X^T`` (float64) of ``layer``'s inputs (after its input quantizer) over ``batches``,
    running the model only up to that layer; padding tokens (``attention_mask`` 0) are left out."""
    device = layer.latent_weight().device
    cols = layer.latent_weight()[0].numel()
    acc = {"h": torch.zeros(cols, cols, dtype=torch.float64, device=device), "n": 0, "mask": None}

    def hook(module, args):
        x, mask = module.quantize_input(args[0]), acc["mask"]
        if isinstance(module, nn.Linear) and mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            x = x[mask.to(x.device)]  # real tokens only
        rows = layer_input_rows(module, x).to(torch.float64)
        acc["h"].addmm_(rows.T, rows)
        acc["n"] += rows.shape[0]
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            acc["mask"] = token_mask(batch)
            try:
                _run(model, batch, device)
            except _Captured:
                pass
    finally:
        handle.remove()
    if acc["n"] == 0:
        raise ValueError("the calibration data never reached layer "
                         f"{type(layer).__name__}: check that the batches are inputs of this model.")
    return acc["h"] * (2.0 / acc["n"])


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
    weight = layer.latent_weight()
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


def quantize(
    model: nn.Module,
    calibration_data: Iterable,
    config: Optional[ADQConfig] = None,
    method: str = "sa",
    damp: float = 0.01,
    bn_reestimate: bool = True,
    progress: bool = True,
    **options,
) -> nn.Module:
    """One-shot post-training quantization (in place; returns the model).

    ``model``: a float model (quantized here with ``config``, mixed precision included when
    ``config.target_avg_bits`` is set) or one already quantized by adq_hf (``config=None``).
    ``calibration_data``: batches of model inputs (tensors, ``(inputs, labels)`` or dicts).
    Layers are quantized one after another, each from inputs that already pass through the
    quantized layers before it; BatchNorm statistics are re-estimated at the end.
    ``options`` go to the solver (``block_size``, ``act_order`` for gptq, ``sensitivity`` for sa).
    The per-layer errors and times are in ``model.ptq_report``.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown PTQ method {method!r}; choose one of {list(METHODS)}.")
    batches = list(calibration_data)
    if not batches:
        raise ValueError("calibration_data is empty: PTQ needs batches of model inputs (e.g. 1,024 training images).")
    was_training = model.training
    model.eval()
    try:
        model.ptq_report = _quantize_in_eval_mode(model, batches, config, method, damp, bn_reestimate, progress,
                                                  options)
    finally:
        model.train(was_training)
    return model


def _quantize_in_eval_mode(model, batches, config, method, damp, bn_reestimate, progress, options) -> Dict[str, dict]:
    from tqdm.auto import tqdm

    with torch.no_grad():
        _run(model, batches[0], next(model.parameters()).device)  # a clear error before any work if it does not fit
    if not any(is_quantized_layer(m) for m in model.modules()):
        if config is None:
            raise ValueError("the model is not quantized: pass an ADQConfig (or quantize_model it first).")
        quantize_model(model, config, calibration_data=batches)
    elif config is not None and config != getattr(model, "quantization_config", config):
        raise ValueError("the model is already quantized with another config; pass config=None to use its own.")
    layers = _forward_order(model, batches[0])
    calibrate_activations(model, batches)
    report = {}
    for name, layer in tqdm(layers, desc=f"PTQ ({method})", disable=not progress):
        if not _supported(layer):
            warnings.warn(f"PTQ: {name} ({type(layer).__name__}) is left at round-to-nearest; its forward "
                          "transforms the weight or pads dynamically.", stacklevel=3)
            cols = layer.latent_weight()[0].numel()
            report[name] = quantize_layer(layer, torch.eye(cols, dtype=torch.float64), "rtn")
            continue
        report[name] = quantize_layer(layer, collect_hessian(model, layer, batches), method, damp, **options)
    if bn_reestimate:
        reestimate_batchnorm(model, batches)
    return report


@torch.no_grad()
def _forward_order(model: nn.Module, batch) -> List:
    """Quantized layers in the order a forward pass reaches them (registration order can differ)."""
    seen, handles = [], []
    for name, layer in quantized_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, m))))
    try:
        _run(model, batch, next(model.parameters()).device)
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
