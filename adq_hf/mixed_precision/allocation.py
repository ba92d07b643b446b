"""Bit allocation under a budget (HAWQ-V3's integer program).

minimise   sum_i  s_i * ||W_i - Q_b(W_i)||^2          (s_i: per-parameter sensitivity, Q_b: the
                                                         weight quantizer the config uses, at b bits)
subject to average bits over all quantized weights <= target_avg_bits   and/or
           packed bytes (codes + look-up tables)    <= max_bytes,
one candidate b per layer, tied layers share b. Solved exactly with ``scipy.optimize.milp``.

"Average bits" (docs/mixed_precision.md): parameter-weighted over the weights of every quantized
Linear/Conv2d layer, the fixed ones (first/last layer at 8 bits, explicit ``layer_bits``)
included; biases, norms, float layers and look-up tables excluded.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import BITS_RANGE, ADQConfig
from ..quantizers import make_weight_quantizer
from .sensitivity import weight_layers

DEFAULT_CANDIDATES = (2, 3, 4, 8)


@torch.no_grad()
def quantization_error(weight: torch.Tensor, bits: int, config: ADQConfig) -> float:
    """``||W - Q_b(W)||^2`` with the config's own weight quantizer, freshly initialised from ``W``."""
    quantizer = make_weight_quantizer(config, bits, weight.shape)
    quantizer.init_from(weight.detach())
    quantizer.eval()
    return float((weight.detach().double() - quantizer(weight.detach()).double()).pow(2).sum())


def lut_bytes(weight: torch.Tensor, bits: int, config: ADQConfig) -> int:
    """Bytes of the look-up table a layer stores next to its codes (fp32 entries)."""
    groups = weight.shape[0] if config.granularity == "per_channel" else 1
    per_group = 2**bits if config.weight_quantizer == "adq" else 1
    return 4 * groups * per_group


def allocate_bits(
    model: nn.Module,
    sensitivity: Dict[str, float],
    target_avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    config: Optional[ADQConfig] = None,
    fixed: Optional[Dict[str, int]] = None,
    ties: Iterable[Sequence[str]] = (),
    method: str = "milp",
) -> Dict[str, int]:
    """Bits per layer in ``sensitivity`` (the layers to allocate); ``fixed`` layers keep their bits but
    count in the budget. ``method="greedy"`` is the baseline the exact solver is compared against."""
    config = config or ADQConfig()
    fixed = dict(fixed or {})
    candidates = sorted(set(int(b) for b in candidates))
    if not candidates or any(b not in BITS_RANGE for b in candidates):
        raise ValueError(f"candidates={list(candidates)} is invalid: expected bits from 2 to 8.")
    if target_avg_bits is None and max_bytes is None:
        raise ValueError("allocate_bits needs a budget: target_avg_bits and/or max_bytes.")
    if method not in ("milp", "greedy"):
        raise ValueError(f"method={method!r} is invalid: expected 'milp' or 'greedy'.")
    weights = weight_layers(model)
    unknown = sorted((set(sensitivity) | set(fixed)) - set(weights))
    if unknown:
        raise ValueError(f"{unknown[:5]} are not Linear/Conv2d layers of the model (sensitivity/fixed keys).")
    names = [n for n in sensitivity if n not in fixed]
    if not names:
        raise ValueError("allocate_bits has no layer to allocate (every layer is fixed).")
    sizes = np.array([weights[n].numel() for n in names], dtype=np.float64)
    cost = np.array([[max(sensitivity[n], 0.0) * quantization_error(weights[n], b, config) for b in candidates]
                     for n in names])
    bits = np.array(candidates, dtype=np.float64)
    fixed_params = sum(weights[n].numel() for n in fixed)
    fixed_bits = sum(weights[n].numel() * b for n, b in fixed.items())
    fixed_bytes = sum(weights[n].numel() * b / 8 + lut_bytes(weights[n], b, config) for n, b in fixed.items())
    lut = np.array([[lut_bytes(weights[n], b, config) for b in candidates] for n in names])

    budgets = []  # (coefficients [layer, candidate], limit, description, smallest feasible)
    if target_avg_bits is not None:
        total = sizes.sum() + fixed_params
        coeff = sizes[:, None] * bits[None, :]
        smallest = (fixed_bits + sizes.sum() * candidates[0]) / total
        budgets.append((coeff, target_avg_bits * total - fixed_bits, f"target_avg_bits={target_avg_bits}",
                        f"{smallest:.4f} average bits"))
    if max_bytes is not None:
        coeff = sizes[:, None] * bits[None, :] / 8 + lut
        smallest = fixed_bytes + coeff[:, 0].sum()
        budgets.append((coeff, max_bytes - fixed_bytes, f"max_bytes={max_bytes}", f"{int(np.ceil(smallest))} bytes"))
    for coeff, limit, what, smallest in budgets:
        if coeff[:, 0].sum() > limit + 1e-6:
            raise ValueError(f"{what} is infeasible with candidates {candidates}: the smallest feasible budget is {smallest}.")

    groups = _tie_groups(names, ties)
    choice = _solve_milp(cost, budgets, groups) if method == "milp" else _solve_greedy(cost, budgets, groups)
    return {n: candidates[c] for n, c in zip(names, choice)}


def _tie_groups(names: List[str], ties) -> List[List[int]]:
    index = {n: i for i, n in enumerate(names)}
    groups = []
    for tie in ties:
        members = [index[n] for n in tie if n in index]
        if len(members) > 1:
            groups.append(members)
    return groups


def _solve_milp(cost, budgets, groups) -> List[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, options = cost.shape
    rows, lower, upper = [], [], []
    for i in range(layers):  # exactly one candidate per layer
        row = np.zeros((layers, options))
        row[i] = 1
        rows.append(row.ravel()), lower.append(1), upper.append(1)
    for coeff, limit, *_ in budgets:
        rows.append(coeff.ravel()), lower.append(-np.inf), upper.append(limit)
    for group in groups:  # tied layers take the same candidate
        for other in group[1:]:
            for b in range(options):
                row = np.zeros((layers, options))
                row[group[0], b], row[other, b] = 1, -1
                rows.append(row.ravel()), lower.append(0), upper.append(0)
    scale = max(cost.max(), 1e-30)  # keep the objective well conditioned for HiGHS
    result = milp(c=(cost / scale).ravel(), constraints=LinearConstraint(np.array(rows), lower, upper),
                  integrality=np.ones(layers * options), bounds=Bounds(0, 1))
    if not result.success:
        raise ValueError(f"the bit allocation has no solution ({result.message}); relax the budget or the ties.")
    return [int(np.argmax(r)) for r in result.x.reshape(layers, options)]


def _solve_greedy(cost, budgets, groups) -> List[int]:
    """Start at the most bits; repeatedly lower the layer (or tie group) that adds the least cost per
    budget unit saved, until every budget holds."""
    layers, options = cost.shape
    units = [[i] for i in range(layers) if not any(i in g for g in groups)] + groups
    choice = [options - 1] * layers

    def usage(coeff):
        return sum(coeff[i, choice[i]] for i in range(layers))

    while any(usage(coeff) > limit + 1e-6 for coeff, limit, *_ in budgets):
        best, best_ratio = None, None
        for unit in units:
            b = choice[unit[0]]
            if b == 0:
                continue
            extra = sum(cost[i, b - 1] - cost[i, b] for i in unit)
            saved = sum(sum(c[i, b] - c[i, b - 1] for c, *_ in budgets) for i in unit)
            ratio = extra / max(saved, 1e-30)
            if best_ratio is None or ratio < best_ratio:
                best, best_ratio = unit, ratio
        if best is None:
            raise ValueError("the greedy allocation cannot meet the budget.")
        for i in best:
            choice[i] -= 1
    return choice


def objective(model: nn.Module, sensitivity: Dict[str, float], bits: Dict[str, int], config: ADQConfig) -> float:
    """``sum_i s_i ||W_i - Q_{b_i}(W_i)||^2`` of an allocation (to compare solvers)."""
    weights = weight_layers(model)
    return sum(sensitivity[n] * quantization_error(weights[n], b, config) for n, b in bits.items())
