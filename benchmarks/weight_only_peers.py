"""Weight-only peers for B5 and the stored-bytes accounting every B5 row is compared by.

Peers (each replaces the weight of every Linear layer adq_hf quantizes by its own dequantized
weight, so the model runs in float32 with exactly the values the peer's format decodes to):

* ``rtn``: round to nearest on a uniform grid, GPTQ's reference quantizer (min-max with 0 included;
  ``symmetric``: ``[-max|w|, max|w|]`` with the zero point in the middle), per output channel or per
  group of input columns, the scale rounded to float16 before use (it is stored as float16).
* ``gptq``: the project's own GPTQ solver (``adq_hf.ptq.solve_gptq``) onto that uniform grid, layer
  after layer on inputs that already pass through the quantized layers before (the reference
  algorithm). Per channel: act-order. Per group: column order, each group's grid fitted when the sweep
  reaches it on the already compensated weights (the reference's ``groupsize`` without ``static_groups``).
* ``hqq``: HQQ through the ``hqq`` library's own ``HQQLinear`` (float16 scale and zero per group of
  ``group_size`` weights; HQQ's default compute dtype, so its stored meta data is float16).
* ``bnb``: bitsandbytes ``quantize_4bit`` / ``dequantize_4bit`` (CPU path), NF4 or FP4, blocks of 64,
  with or without double quantization of the absmax values (``compress_statistics``). 4-bit only.

Accounting (docs/format.md, "Bits per weight"): ``Storage.counted`` holds what a format must store to
decode a layer's weight (codes, scales, zeros, tables, at their stored dtype); ``Storage.header`` the
fixed per-layer configuration it also writes (bit width, shape, packing name, JSON quant state,
training counters): a few bytes per layer, reported, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from adq_hf.packing import pack_codes
from adq_hf.ptq import collect_hessian, inverse_hessian, nearest_level, prepare_hessian, solve_gptq


@dataclass
class Storage:
    """The tensors one quantized layer is stored as (see the module docstring)."""
    counted: Dict[str, torch.Tensor]
    header: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def counted_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.counted.values())

    @property
    def header_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.header.values())


def bits_per_weight(storage: Dict[str, Storage], weights: int) -> float:
    """Stored bits per weight of a set of layers: 8 * counted bytes / number of their weights."""
    return 8 * sum(s.counted_bytes for s in storage.values()) / weights


# --------------------------------------------------------------------------------------------
# Uniform grid (RTN, GPTQ): codes, float16 scale and b-bit zero point per row or group
# --------------------------------------------------------------------------------------------
def uniform_grid(w: torch.Tensor, bits: int, symmetric: bool):
    """GPTQ's reference quantizer for each row of ``w [R, C]``: ``(scale [R, 1], zero [R, 1])`` such
    that the levels are ``scale * (k - zero)``, ``k = 0 .. 2**bits - 1``; 0 is always a level, the scale
    is rounded to float16 (its stored dtype) and the integer zero point is found with that scale."""
    maxq = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = ((hi - lo) / maxq).to(torch.float16).to(w.dtype)
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def grid_levels(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, 2**bits]`` ascending tables ``scale * (k - zero)``."""
    return scale * (torch.arange(2**bits, dtype=scale.dtype, device=scale.device) - zero)


def uniform_storage(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> Storage:
    """``q [R, C]`` on the grids of ``scale, zero [R, groups]`` (groups of equal width along C) as the
    stored tensors: b-bit codes, float16 scales, b-bit zero points (asymmetric only, as GPTQ's qzeros)."""
    rows, cols = q.shape
    width = cols // scale.shape[1]
    s, z = scale.repeat_interleave(width, dim=1), zero.repeat_interleave(width, dim=1)
    codes = torch.round(q / s + z).to(torch.int64)
    counted = {"qweight": pack_codes(codes, bits), "scales": scale.to(torch.float16)}
    if not symmetric:
        counted["qzeros"] = pack_codes(zero.to(torch.int64), bits)
    return Storage(counted)


def _grid_by_group(w: torch.Tensor, bits: int, symmetric: bool, group_size: Optional[int]):
    """Per-row grids of each group of ``group_size`` columns (one group per row when None):
    ``scale, zero [R, groups]``."""
    width = w.shape[1] if group_size is None else group_size
    if w.shape[1] % width:
        raise ValueError(f"{w.shape[1]} input columns are not a multiple of group_size={group_size}.")
    pieces = [uniform_grid(w[:, a:a + width], bits, symmetric) for a in range(0, w.shape[1], width)]
    return torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)


def rtn(weight: torch.Tensor, bits: int, symmetric: bool = False, group_size: Optional[int] = None, **_):
    w = weight.detach().to(torch.float64)
    scale, zero = _grid_by_group(w, bits, symmetric, group_size)
    width = w.shape[1] // scale.shape[1]
    q = torch.cat([nearest_level(w[:, g * width:(g + 1) * width], grid_levels(scale[:, g:g + 1], zero[:, g:g + 1], bits))
                   for g in range(scale.shape[1])], 1)
    return q, uniform_storage(q, scale, zero, bits, symmetric)


def gptq(weight: torch.Tensor, bits: int, hessian: torch.Tensor, symmetric: bool = False,
         group_size: Optional[int] = None, damp: float = 0.01, **_):
    """GPTQ onto the uniform grid. Per group, the sweep is cut at group boundaries: the group's columns
    go through ``solve_gptq`` with the Hessian of the problem that is left (the inverse of the leading
    block of the remaining ``H^-1``), then the remaining columns get the compensation that the sweep
    over the group would have applied (``-(W_S - Q_S) Hinv_SS^-1 Hinv_SF``), and ``H^-1`` is reduced to
    the remaining columns. Column by column this equals GPTQ's own sweep (tests check it)."""
    w = weight.detach().to(torch.float64).clone()
    if group_size is not None and w.shape[1] % group_size:
        raise ValueError(f"{w.shape[1]} input columns are not a multiple of group_size={group_size}.")
    h = prepare_hessian(hessian, damp)
    if group_size is None:
        scale, zero = uniform_grid(w, bits, symmetric)
        q = solve_gptq(w, h, grid_levels(scale, zero, bits), act_order=True)
        return q, uniform_storage(q, scale, zero, bits, symmetric)
    hinv, scales, zeros = inverse_hessian(h), [], []
    for a in range(0, w.shape[1], group_size):
        g = min(group_size, w.shape[1] - a)
        scale, zero = uniform_grid(w[:, a:a + g], bits, symmetric)  # on the compensated weights, as GPTQ
        top = hinv[:g, :g]
        q = solve_gptq(w[:, a:a + g], torch.cholesky_inverse(torch.linalg.cholesky(top)),
                       grid_levels(scale, zero, bits), act_order=False, block_size=g)
        if a + g < w.shape[1]:
            coupling = torch.linalg.solve(top, hinv[:g, g:])
            w[:, a + g:] -= (w[:, a:a + g] - q) @ coupling
            hinv = hinv[g:, g:] - hinv[g:, :g] @ coupling
        w[:, a:a + g] = q
        scales.append(scale)
        zeros.append(zero)
    return w, uniform_storage(w, torch.cat(scales, 1), torch.cat(zeros, 1), bits, symmetric)


# --------------------------------------------------------------------------------------------
# Library peers
# --------------------------------------------------------------------------------------------
def hqq(weight: torch.Tensor, bits: int, group_size: int = 64, axis: int = 1, **_):
    """HQQ's own ``HQQLinear`` on a copy of the layer (float16 meta data, optimised zero/scale).
    ``axis=1`` (HQQ's default, what its fast kernels need): a group is ``group_size`` consecutive
    weights of one row; ``axis=0``: HQQ views the flattened weight as ``[group_size, -1]`` and groups
    its columns: ``group_size`` weights of one input column, ``out / group_size`` rows apart."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight.detach().float())
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)
    layer = HQQLinear(linear, config, compute_dtype=torch.float16, device="cpu")
    state = layer.state_dict()
    counted = {k: state[k] for k in ("W_q", "scale", "zero")}
    header = {k: v for k, v in state.items() if k not in counted and k != "bias" and torch.is_tensor(v)}
    return layer.dequantize().to(torch.float64), Storage(counted, header)


def bnb(weight: torch.Tensor, bits: int = 4, quant_type: str = "nf4", double_quant: bool = False, **_):
    """bitsandbytes' 4-bit block quantization (blocks of 64) on the CPU; the stored tensors are the
    packed codes and ``QuantState.as_dict(packed=True)`` (what transformers serializes for bnb-4bit)."""
    import bitsandbytes.functional as bnbf

    if bits != 4:
        raise ValueError(f"bitsandbytes' NF4/FP4 are 4-bit formats, got bits={bits}.")
    packed, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=64, quant_type=quant_type,
                                       compress_statistics=double_quant)
    q = bnbf.dequantize_4bit(packed, state).to(torch.float64)
    tensors = state.as_dict(packed=True)
    counted = {"weight": packed, **{k: v for k, v in tensors.items() if not k.startswith("quant_state.")}}
    header = {k: v for k, v in tensors.items() if k.startswith("quant_state.")}  # the JSON quant state
    return q, Storage(counted, header)


@dataclass(frozen=True)
class Peer:
    """One peer method: the function, its options, whether it needs layer Hessians, and a description."""
    quantize: Callable
    options: dict
    calibrated: bool
    how: str


PEERS: Dict[str, Peer] = {
    "rtn": Peer(rtn, {}, False, "RTN per channel, uniform min-max asymmetric grid (fp16 scale, b-bit zero)"),
    "rtn_sym": Peer(rtn, {"symmetric": True}, False, "RTN per channel, uniform symmetric grid (fp16 scale)"),
    "gptq": Peer(gptq, {}, True, "GPTQ (adq_hf solver, act-order) per channel, uniform asymmetric grid"),
    "gptq_g128": Peer(gptq, {"group_size": 128}, True, "GPTQ (adq_hf solver), groups of 128, uniform asymmetric grid"),
    "gptq_g64": Peer(gptq, {"group_size": 64}, True, "GPTQ (adq_hf solver), groups of 64, uniform asymmetric grid"),
    "hqq_g64": Peer(hqq, {"group_size": 64}, False, "HQQ (hqq library), groups of 64, fp16 scale and zero"),
    "hqq_g128": Peer(hqq, {"group_size": 128}, False, "HQQ (hqq library), groups of 128, fp16 scale and zero"),
    "hqq_g64_axis0": Peer(hqq, {"group_size": 64, "axis": 0}, False,
                          "HQQ (hqq library), axis=0: groups of 64 weights of one input column, fp16 scale and zero"),
    "hqq_g128_axis0": Peer(hqq, {"group_size": 128, "axis": 0}, False,
                           "HQQ (hqq library), axis=0: groups of 128 weights of one input column, fp16 scale and zero"),
    "nf4": Peer(bnb, {"quant_type": "nf4"}, False, "bitsandbytes NF4, blocks of 64, fp32 absmax"),
    "nf4_dq": Peer(bnb, {"quant_type": "nf4", "double_quant": True}, False,
                   "bitsandbytes NF4, blocks of 64, double-quantized absmax"),
    "fp4": Peer(bnb, {"quant_type": "fp4"}, False, "bitsandbytes FP4, blocks of 64, fp32 absmax"),
}


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def forward_order(model: nn.Module, names: List[str], batch: dict) -> List[str]:
    """``names`` in the order a forward pass reaches the layers (unreached ones last)."""
    modules, seen = dict(model.named_modules()), []
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.append(n)) for n in names]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(n for n in seen))
    return order + [n for n in names if n not in order]


@torch.no_grad()
def quantize_linears(model: nn.Module, names: List[str], peer: str, bits: int,
                     calibration: Optional[List[dict]] = None) -> Dict[str, Storage]:
    """Replace, in place, the weight of each named Linear layer by ``peer``'s dequantized weight,
    layer after layer in forward order (a calibrated peer sees inputs through the layers already
    quantized); returns each layer's ``Storage``."""
    spec = PEERS[peer]
    if spec.calibrated and not calibration:
        raise ValueError(f"peer {peer!r} needs calibration batches (its layer Hessians).")
    modules = dict(model.named_modules())
    order = forward_order(model, names, calibration[0]) if spec.calibrated else names
    stored = {}
    for name in order:
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}: the peers quantize nn.Linear layers only.")
        extra = {"hessian": collect_hessian(model, layer, calibration)} if spec.calibrated else {}
        q, stored[name] = spec.quantize(layer.weight, bits, **spec.options, **extra)
        layer.weight.copy_(q.to(layer.weight.dtype))
    return stored


def state_with_storage(model: nn.Module, stored: Dict[str, Storage]) -> Dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer's float weight replaced by its stored tensors
    (counted and header), as a checkpoint of that format would hold them."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if not any(k == f"{name}.weight" for name in stored)}
    for name, storage in stored.items():
        for key, tensor in {**storage.counted, **storage.header}.items():
            state[f"{name}.{key}"] = tensor.detach().contiguous().clone()
    return state


def adq_checkpoint_storage(files: List[str], layers: Dict[str, int]) -> Dict[str, Storage]:
    """The ``Storage`` of adq_hf's quantized layers in saved safetensors ``files`` (docs/format.md):
    counted are the packed codes ``L.weight`` and the weight quantizer's floating-point tensors
    (codebooks, steps, scales); its integer counters (``num_updates``, ``num_steps``) are header."""
    from safetensors import safe_open

    stored = {name: Storage({}) for name in layers}
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                name = next((n for n in layers if key == f"{n}.weight" or key.startswith(f"{n}.weight_quantizer.")), None)
                if name is None:
                    continue
                tensor = fh.get_tensor(key)
                part = key[len(name) + 1:]
                if part == "weight" and tensor.dtype != torch.uint8:
                    raise ValueError(f"{key} in {path} is a {tensor.dtype} weight, not packed codes: not an adq_hf "
                                     "checkpoint of this model.")
                if part == "weight" or tensor.is_floating_point():
                    stored[name].counted[part] = tensor
                else:
                    stored[name].header[part] = tensor
    missing = [n for n, s in stored.items() if "weight" not in s.counted]
    if missing:
        raise ValueError(f"no packed codes for {missing[:3]} in {files}: not an adq_hf checkpoint of this model.")
    return stored
