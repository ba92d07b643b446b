"""Resident memory of a quantized model against the information limit and fp32."""

from __future__ import annotations

import math
from typing import Dict

from torch import nn

from ..nn import weight_owners
from .layers import DeployedLayerMixin


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def resident_bytes(module: nn.Module) -> int:
    """Bytes of all tensors a module holds (parameters and buffers, persistent or not, including
    cached decoded weights), each storage counted once."""
    return _unique_bytes(list(module.parameters()) + list(module.buffers()))


def memory_report(model: nn.Module) -> Dict[str, int]:
    """Resident memory of a quantized model (fake-quant or deployed) against the information limit.

    ``quantized_weight_bytes``: what the quantized layers' weights occupy (deployed: packed codes,
    tables and quantizer state, plus cached decoded weights; fake-quant: the float latent weight and
    quantizer state); ``information_limit_bytes``: sum over quantized layers of ``params * bits / 8``
    plus the state the tables are built from, as stored (``table_bytes()``: codebooks, per-group
    scales, steps); ``bits_per_weight``: the information limit in bits per quantized weight (codes
    and tables: what a group's scale or codebook costs is in it); ``fp32_weight_bytes``: the same
    weights in fp32; ``resident_bytes``: every tensor of the model.
    """
    weight_tensors, limit, fp32, params = [], 0.0, 0, 0
    for _, layer in weight_owners(model):  # a tied weight once
        deployed = isinstance(layer, DeployedLayerMixin)
        numel = math.prod(layer.weight_shape if deployed else layer.latent_weight().shape)
        limit += numel * layer.weight_bits / 8 + layer.weight_quantizer.table_bytes()
        fp32 += numel * 4
        params += numel
        weight_tensors.append(layer._buffers["weight"] if deployed else layer.latent_weight())
        weight_tensors.append(layer._buffers.get("decoded_weight"))
        weight_tensors.extend(layer.weight_quantizer.parameters())
        weight_tensors.extend(layer.weight_quantizer.buffers())
    return {
        "quantized_weight_bytes": _unique_bytes(weight_tensors),
        "information_limit_bytes": int(round(limit)),
        "bits_per_weight": 8 * limit / max(params, 1),
        "fp32_weight_bytes": fp32,
        "resident_bytes": resident_bytes(model),
    }
