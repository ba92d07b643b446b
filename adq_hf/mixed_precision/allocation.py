"""Bit allocation under a budget (HAWQ-V3's integer program).

minimise   sum_i  s_i * ||W_i - Q_b(W_i)||^2          (s_i: per-parameter sensitivity, Q_b: the
                                                         weight quantizer the config uses, at b bits)
subject to average weight bits (below)              <= target_avg_bits   and/or
           packed bytes (codes + quantizer tables)  <= max_bytes,
one candidate b per layer, tied layers share b. Solved exactly with ``scipy.optimize.milp``.

"Average weight bits" (docs/mixed_precision.md, ``average_bits``): parameter-weighted over the
weights of every quantized layer (each weight once), the fixed ones (first/last layer at their bits,
explicit ``layer_bits``) included; biases, norms, float layers and look-up tables excluded. It is
the number ``adq_hf.average_weight_bits(model)`` reports for the quantized model.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..config import BITS_RANGE, ADQConfig
from ..nn import output_major
from ..packing import packed_size
from ..quantizers import make_weight_quantizer
from .sensitivity import weight_layers

DEFAULT_CANDIDATES = (2, 3, 4, 8)
METHODS = ("milp", "greedy")


def average_bits(bits: Mapping[str, int], params: Mapping[str, int]) -> float:
    """The one definition of average weight bits: ``sum(params * bits) / sum(params)`` over the
    quantized layers in ``bits`` (``params[name]`` = the layer's weight ``numel``)."""
    total = sum(params[n] for n in bits)
    return sum(params[n] * b for n, b in bits.items()) / max(total, 1)


@torch.no_grad()
def candidate_stats(weight: torch.Tensor, bits: int, config: ADQConfig) -> Tuple[float, int]:
    """``(||W - Q_b(W)||^2, table bytes)`` with the config's own weight quantizer, freshly
    initialised from ``W`` and run in eval mode (no EMA step). Table bytes: the quantizer's
    floating-point state (codebooks, per-group scales, steps) stored next to the packed codes
    (``WeightQuantizer.table_bytes``)."""
    quantizer = make_weight_quantizer(config, bits, weight.shape).to(weight.device)
    quantizer.init_from(weight.detach())
    quantizer.eval()
    w = weight.detach()
    error = float((w.double() - quantizer(w).double()).pow(2).sum())
    return error, quantizer.table_bytes()


def quantization_error(weight: torch.Tensor, bits: int, config: ADQConfig) -> float:
    """``||W - Q_b(W)||^2`` with the config's weight quantizer, freshly initialised from ``W``."""
    return candidate_stats(weight, bits, config)[0]


def lut_bytes(weight: torch.Tensor, bits: int, config: ADQConfig) -> int:
    """Bytes of the quantizer tables (codebook / steps) a layer stores next to its packed codes."""
    return candidate_stats(weight, bits, config)[1]


def layer_bytes(weight: torch.Tensor, bits: int, config: ADQConfig) -> int:
    """Packed bytes of one layer: ``ceil(numel * bits / 8)`` codes plus its quantizer tables."""
    return packed_size(weight.numel(), bits) + lut_bytes(weight, bits, config)


def output_major_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``weight_layers(model)`` in the layout the quantizers see (output channels first)."""
    modules = dict(model.named_modules())
    return {name: output_major(modules[name], weight) for name, weight in weight_layers(model).items()}


def _check_number(name: str, value, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        raise ValueError(f"{name}={value!r} is invalid: expected a positive number.")


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
    """Bits ``{layer: b}`` for every layer in ``sensitivity`` that is not in ``fixed``.

    Minimises ``sum_i s_i ||W_i - Q_{b_i}(W_i)||^2`` (``Q_b``: ``config``'s weight quantizer at ``b``
    bits, default ``ADQConfig()``) over ``b_i`` in ``candidates`` subject to
    ``average_bits(allocated + fixed) <= target_avg_bits`` and/or
    ``sum(packed codes + quantizer tables) over allocated + fixed <= max_bytes``. ``fixed`` layers
    (e.g. the first conv and classifier at 8 bits) keep their bits but count in both budgets.
    ``ties``: groups of layer names that must share bits (none by default). Negative sensitivities
    (a locally concave loss; estimator noise on near-flat layers) count as 0.
    ``method="milp"`` is exact (``scipy.optimize.milp``); ``"greedy"`` is the baseline it is
    compared against in the tests and benchmarks. An infeasible budget raises ``ValueError`` naming
    the smallest feasible budget.
    """
    config = config or ADQConfig()
    if not isinstance(config, ADQConfig):
        raise ValueError(f"config must be an adq_hf.ADQConfig, got {type(config).__name__}.")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {list(METHODS)}.")
    if target_avg_bits is None and max_bytes is None:
        raise ValueError("allocate_bits needs a budget: target_avg_bits and/or max_bytes.")
    if target_avg_bits is not None:
        _check_number("target_avg_bits", target_avg_bits)
    if max_bytes is not None:
        _check_number("max_bytes", max_bytes)
    raw = list(candidates)
    if not raw or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b not in BITS_RANGE for b in raw):
        raise ValueError(f"candidates={raw} is invalid: expected integer bits from "
                         f"{BITS_RANGE.start} to {BITS_RANGE.stop - 1}.")
    candidates = sorted(set(int(b) for b in raw))
    fixed = dict(fixed or {})
    for name, b in fixed.items():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b not in BITS_RANGE:
            raise ValueError(f"fixed[{name!r}]={b!r} is invalid: expected integer bits from 2 to 8.")
    if not isinstance(sensitivity, Mapping):
        raise ValueError("sensitivity must be a dict {layer name: value} (from estimate_sensitivity).")
    weights = output_major_weights(model)
    unknown = sorted((set(sensitivity) | set(fixed)) - set(weights))
    if unknown:
        raise ValueError(f"{unknown[:5]} are not quantizable layers of the model (sensitivity/fixed keys); "
                         f"layer names look like {list(weights)[:3]}.")
    bad = [n for n, s in sensitivity.items() if isinstance(s, bool) or not isinstance(s, (int, float, np.floating))
           or not math.isfinite(s)]
    if bad:
        raise ValueError(f"sensitivity of {bad[:5]} is not a finite number.")
    names = [n for n in sensitivity if n not in fixed]
    if not names:
        raise ValueError("allocate_bits has no layer to allocate (every layer in sensitivity is fixed).")

    stats = {n: [candidate_stats(weights[n], b, config) for b in candidates] for n in names}
    cost = np.array([[max(float(sensitivity[n]), 0.0) * e for e, _ in stats[n]] for n in names])
    sizes = np.array([weights[n].numel() for n in names], dtype=np.float64)
    bits = np.array(candidates, dtype=np.float64)
    fixed_params = sum(weights[n].numel() for n in fixed)
    fixed_bits = sum(weights[n].numel() * b for n, b in fixed.items())
    fixed_bytes = sum(layer_bytes(weights[n], b, config) for n, b in fixed.items())
    nbytes = np.array([[packed_size(weights[n].numel(), b) + t for b, (_, t) in zip(candidates, stats[n])]
                       for n in names], dtype=np.float64)

    budgets = []  # (coefficients [layer, candidate], limit)
    if target_avg_bits is not None:
        total = sizes.sum() + fixed_params
        coeff = sizes[:, None] * bits[None, :]
        limit = target_avg_bits * total - fixed_bits
        if coeff.min(axis=1).sum() > limit + 1e-6 * total:
            smallest = (fixed_bits + coeff.min(axis=1).sum()) / total
            raise ValueError(
                f"target_avg_bits={target_avg_bits} is infeasible with candidates {candidates} and fixed layers "
                f"({len(fixed)} at their own bits): the smallest feasible budget is "
                f"{math.ceil(smallest * 1e4) / 1e4:.4f} average bits."
            )
        budgets.append((coeff, limit))
    if max_bytes is not None:
        limit = max_bytes - fixed_bytes
        if nbytes.min(axis=1).sum() > limit:
            smallest = int(fixed_bytes + nbytes.min(axis=1).sum())
            raise ValueError(f"max_bytes={max_bytes} is infeasible with candidates {candidates}: the smallest "
                             f"feasible budget is {smallest} bytes.")
        budgets.append((nbytes, limit))

    groups = _tie_groups(names, fixed, ties)
    if method == "greedy":
        choice = _solve_greedy(cost, budgets, groups)
    else:
        # HiGHS accepts a solution within its feasibility tolerance of the (scaled) budget rows; usage
        # is integral (parameter-bits, bytes), so re-solve with the limit lowered by any excess.
        limits = [limit for _, limit in budgets]
        for _ in range(5):
            choice = _solve_milp(cost, [(c, l) for (c, _), l in zip(budgets, limits)], groups)
            excess = [_usage(c, choice) - limit for c, limit in budgets]
            if all(e <= 1e-9 * max(abs(limit), 1.0) for e, (_, limit) in zip(excess, budgets)):
                break
            limits = [l - max(e, 0.0) for l, e in zip(limits, excess)]
        else:
            raise ValueError("the MILP solver could not meet the budget exactly; report this with the model.")
    result = {n: candidates[c] for n, c in zip(names, choice)}
    if target_avg_bits is not None:  # the definition, checked on the answer
        params = {n: weights[n].numel() for n in list(result) + list(fixed)}
        assert average_bits({**fixed, **result}, params) <= target_avg_bits + 1e-9, "allocation broke the budget"
    return result


def _usage(coeff: np.ndarray, choice: List[int]) -> float:
    return float(sum(coeff[i, c] for i, c in enumerate(choice)))


def _tie_groups(names: List[str], fixed: Dict[str, int], ties) -> List[List[int]]:
    index = {n: i for i, n in enumerate(names)}
    groups, seen = [], set()
    for tie in ties:
        if isinstance(tie, str):
            raise ValueError(f"ties must be groups of layer names, e.g. [('a', 'b')], got the string {tie!r}.")
        for n in tie:
            if n in fixed:
                raise ValueError(f"tie {list(tie)}: {n!r} is a fixed layer; tie only allocated layers.")
            if n not in index:
                raise ValueError(f"tie {list(tie)}: {n!r} is not among the allocated layers (sensitivity keys).")
            if n in seen:
                raise ValueError(f"{n!r} is in more than one tie group; merge the groups.")
            seen.add(n)
        if len(tie) > 1:
            groups.append([index[n] for n in tie])
    return groups


def _solve_milp(cost, budgets, groups) -> List[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, options = cost.shape
    rows, lower, upper = [], [], []
    for i in range(layers):  # exactly one candidate per layer
        row = np.zeros((layers, options))
        row[i] = 1
        rows.append(row.ravel()), lower.append(1), upper.append(1)
    for coeff, limit in budgets:
        scale = max(np.abs(coeff).max(), 1.0)  # keep the constraint well conditioned for HiGHS
        rows.append(coeff.ravel() / scale), lower.append(-np.inf), upper.append(limit / scale)
    for group in groups:  # tied layers take the same candidate
        for other in group[1:]:
            for b in range(options):
                row = np.zeros((layers, options))
                row[group[0], b], row[other, b] = 1, -1
                rows.append(row.ravel()), lower.append(0), upper.append(0)
    scale = max(cost.max(), 1e-300)  # keep the objective well conditioned for HiGHS
    result = milp(c=(cost / scale).ravel(), constraints=LinearConstraint(np.array(rows), lower, upper),
                  integrality=np.ones(layers * options), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if not result.success or result.x is None:
        raise ValueError(f"the bit allocation has no solution ({result.message}); relax the budget or the ties.")
    return [int(np.argmax(r)) for r in result.x.reshape(layers, options)]


def _solve_greedy(cost, budgets, groups) -> List[int]:
    """Start every layer at the most bits; repeatedly lower by one candidate the layer (or tie group)
    with the smallest cost increase per budget unit saved (summed over the budgets, each normalised
    by its limit), until every budget holds."""
    layers, options = cost.shape
    grouped = {i for g in groups for i in g}
    units = [[i] for i in range(layers) if i not in grouped] + groups
    choice = [options - 1] * layers

    def over():
        return any(sum(c[i, choice[i]] for i in range(layers)) > limit + 1e-9 * abs(limit) for c, limit in budgets)

    while over():
        best, best_ratio = None, None
        for unit in units:
            b = choice[unit[0]]
            if b == 0:
                continue
            extra = sum(cost[i, b - 1] - cost[i, b] for i in unit)
            saved = sum(sum(c[i, b] - c[i, b - 1] for i in unit) / max(abs(limit), 1e-30) for c, limit in budgets)
            ratio = extra / max(saved, 1e-30)
            if best_ratio is None or ratio < best_ratio:
                best, best_ratio = unit, ratio
        if best is None:
            raise ValueError("the greedy allocation cannot meet the budget.")
        for i in best:
            choice[i] -= 1
    return choice


def objective(model: nn.Module, sensitivity: Dict[str, float], bits: Dict[str, int], config: ADQConfig) -> float:
    """``sum_i max(s_i, 0) ||W_i - Q_{b_i}(W_i)||^2`` of an allocation (to compare solvers)."""
    weights = output_major_weights(model)
    return sum(max(sensitivity[n], 0.0) * quantization_error(weights[n], b, config) for n, b in bits.items())
