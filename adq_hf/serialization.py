"""Quantized state dicts <-> packed safetensors (format: docs/format.md).

A quantized layer's float ``weight`` is stored as its packed b-bit codes under the same name,
``<layer>.weight`` (uint8, 1-D), next to its quantizer state (codebook / step / thresholds); every
other tensor is stored as is. Keeping the name is deliberate: a loader that does not know adq_hf
(plain transformers, timm) finds ``weight`` with the wrong shape and stops with a size-mismatch
error instead of silently leaving the weights at random values. The safetensors header carries
the format name, version and per-layer shape and bits, so a file is checked against the model
before anything is loaded. Only safetensors is ever read: no pickle.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Tuple

import torch
from torch import nn

from .nn import output_major, quantized_layers
from .packing import pack_codes, packed_size, unpack_codes

FORMAT_KEY = "adq_hf_format"  # header key holding the format version; "format" stays "pt" for transformers
FORMAT_VERSION = "1"
CODES_SUFFIX = "weight"  # the packed codes take the float weight's name (see above)
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or is not an adq_hf checkpoint."""


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


@torch.no_grad()
def quantized_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The packed state dict of a quantized model and its safetensors metadata. A weight tied between
    layers is stored once, under its owner; the layers tied to it are listed with ``tied_to``."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    layers = {}
    names = {id(m): n for n, m in quantized_layers(model)}
    for name, layer in quantized_layers(model):
        shape, dtype = _float_weight_info(layer)
        layers[name] = {"shape": list(shape), "bits": layer.weight_bits, "dtype": str(dtype)}
        if layer.tied_to is not None:
            state.pop(_prefix(name) + "weight", None)
            layers[name]["tied_to"] = names[id(layer.tied_to)]
        elif not _is_deployed(layer):  # a deployed layer's ``weight`` already is its packed codes
            codes = layer.weight_quantizer.encode(output_major(layer, state[_prefix(name) + "weight"]))
            state[_prefix(name) + CODES_SUFFIX] = pack_codes(codes.cpu(), layer.weight_bits)
    if not layers:
        raise CheckpointError("the model has no quantized layer: quantize it with adq_hf.quantize_model first.")
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", FORMAT_KEY: FORMAT_VERSION, "layers": json.dumps(layers, sort_keys=True)}
    return state, metadata


def _is_deployed(layer: nn.Module) -> bool:
    """A deployed layer (adq_hf.deploy) keeps packed codes in ``_buffers["weight"]``, no float weight."""
    return getattr(layer, "is_deployed", False)


def _float_weight_info(layer: nn.Module):
    """``(shape, dtype)`` of a quantized layer's float weight (in the layer's own layout)."""
    if _is_deployed(layer):
        return tuple(layer.weight_shape), layer.weight_dtype
    if layer.tied_to is not None:
        return _float_weight_info(layer.tied_to)
    weight = layer.latent_weight()
    return tuple(weight.shape), weight.dtype


def _check_metadata(metadata, source: str) -> Dict[str, dict]:
    if not metadata or FORMAT_KEY not in metadata or "layers" not in metadata:
        raise CheckpointError(
            f"{source} is not an adq_hf quantized checkpoint (no '{FORMAT_KEY}' tag in its header); "
            "load a float checkpoint with quantization_config=ADQConfig(...) to quantize it instead."
        )
    if metadata[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has adq_hf format version {metadata[FORMAT_KEY]!r}; this adq_hf reads "
            f"version {FORMAT_VERSION}: upgrade adq_hf."
        )
    return json.loads(metadata["layers"])


@torch.no_grad()
def load_quantized_state_dict(
    model: nn.Module, state: Dict[str, torch.Tensor], metadata: Dict[str, str], source: str = "checkpoint"
) -> None:
    """Load a packed state dict into a model already converted with the same config. Strict."""
    layers = _check_metadata(metadata, source)
    state = dict(state)
    model_layers = dict(quantized_layers(model))
    if set(layers) != set(model_layers):
        missing, extra = sorted(set(model_layers) - set(layers)), sorted(set(layers) - set(model_layers))
        raise CheckpointError(
            f"{source} does not match the model's quantized layers (missing in file: {missing[:5]}, "
            f"not in model: {extra[:5]}): the model must be built with the checkpoint's quantization_config."
        )
    codes_of = {}
    names = {id(m): n for n, m in model_layers.items()}
    for name, layer in model_layers.items():
        info, (shape, _) = layers[name], _float_weight_info(layer)
        numel = math.prod(shape)
        if list(shape) != info["shape"] or layer.weight_bits != info["bits"]:
            raise CheckpointError(
                f"{source}: layer {name!r} is stored as {info['bits']}-bit {info['shape']}, but the model "
                f"expects {layer.weight_bits}-bit {list(shape)}: the config or architecture differs."
            )
        tied_to = None if layer.tied_to is None else names[id(layer.tied_to)]
        if info.get("tied_to") != tied_to:
            raise CheckpointError(f"{source}: layer {name!r} is stored tied to {info.get('tied_to')!r}, but the model "
                                  f"ties it to {tied_to!r}: the config or architecture differs.")
        if tied_to is not None:
            continue  # its weight is its owner's
        key = _prefix(name) + CODES_SUFFIX
        packed = state.pop(key, None)
        if packed is None:
            raise CheckpointError(f"{source} lacks {key!r}.")
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise CheckpointError(f"{source}: {key!r} is {packed.dtype} {list(packed.shape)}, not packed uint8 codes: "
                                  "the file is damaged or was not written by adq_hf.")
        if packed.numel() != packed_size(numel, info["bits"]):
            raise CheckpointError(f"{source}: {key!r} has {packed.numel()} bytes, expected "
                                  f"{packed_size(numel, info['bits'])}: the file is damaged.")
        codes_of[name] = packed
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches (codebook groups, float layers): still a checkpoint problem
        raise CheckpointError(f"{source} does not match the model: {err}") from None
    expected_missing = {_prefix(n) + "weight" for n in model_layers}  # popped above: decoded below (or tied)
    missing = sorted(set(result.missing_keys) - expected_missing)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}."
        )
    for name, packed in codes_of.items():  # quantizer state is loaded now: decode with it
        layer = model_layers[name]
        if _is_deployed(layer):  # deploy mode keeps the packed codes as they are
            layer.set_packed_codes(packed)
            continue
        rows = output_major(layer, layer.latent_weight())
        codes = unpack_codes(packed, layer.weight_bits, rows.numel()).reshape(rows.shape)
        rows.copy_(layer.weight_quantizer.decode(codes.to(rows.device)).to(rows.dtype))


def save_file(model: nn.Module, path: str) -> None:
    """Write the packed checkpoint atomically (a crash never leaves a half-written file behind)."""
    from safetensors.torch import save_file as st_save

    state, metadata = quantized_state_dict(model)
    tmp = f"{path}.tmp-{os.getpid()}"
    st_save(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a safetensors checkpoint with clear errors for pickle files and damaged files."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        tensors = {}
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        # Only a file safetensors cannot read is checked for pickle, and one whose 9th byte is not the "{"
        # of a safetensors JSON header: a safetensors file starts with its 8-byte header length, whose
        # first bytes can be 0x80 or "PK" too (one header length in 256).
        with open(path, "rb") as fh:
            head = fh.read(9)
        if (head[:2] == b"PK" or head[:1] == b"\x80") and head[8:9] != b"{":
            raise CheckpointError(
                f"{path} is a pickle (torch.save) file; adq_hf only loads safetensors, which cannot run code. "
                "Convert it with safetensors.torch.save_file(state_dict, 'model.safetensors')."
            ) from None
        raise CheckpointError(f"{path} is damaged or truncated ({err}); download or save it again.") from None
    return tensors, metadata


def load_file(model: nn.Module, path: str) -> None:
    tensors, metadata = read_file(path)
    load_quantized_state_dict(model, tensors, metadata, source=path)
