"""The small interface every quantizer implements, and the name registry.

Quantized layers (``adq_hf.nn``) only talk to this interface, so a new method is one new file
plus one ``register_*_quantizer`` call; nothing else in the package changes.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Type

import torch
from torch import nn


class WeightQuantizer(nn.Module):
    """Maps a float weight tensor to a fake-quantized one with at most ``2**bits`` values per group.

    Subclasses implement:
      * ``init_from(weight)``: set the quantizer's state (levels, steps) from float weights;
      * ``forward(weight)``: fake-quantized weight, straight-through (or learned) gradients;
      * ``encode(weight)``: integer codes in ``[0, 2**bits)`` (int64, same shape as ``weight``);
      * ``decode(codes)``: float weight from codes, equal to ``forward(weight)`` in value.
    ``decode(encode(w))`` is what a packed checkpoint stores, so it must equal ``forward(w)``.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)

    @property
    def num_levels(self) -> int:
        return 2 ** self.bits

    def init_from(self, weight: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def levels(self) -> torch.Tensor:
        """The values codes decode to, ``[groups, 2**bits]`` (a look-up table per group)."""
        raise NotImplementedError  # pragma: no cover - interface

    def table_bytes(self) -> int:
        """Bytes of the floating-point state the tables are built from (codebooks, scales, steps) at
        the dtype it is stored in: what a checkpoint keeps next to the packed codes, and what average
        bits per weight must include (a group's table or scale is not free)."""
        state = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in state if t.is_floating_point())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input to ``2**bits`` uniform integer levels times a scale.

    Parameters whose values depend on the data are set on the first forward (``initialized``
    buffer), so a model is calibrated by running one batch through it before training; under
    DDP do this before wrapping so every rank starts from rank 0's values.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Signed (inputs that can be negative) or unsigned (after ReLU): decided on the first batch.
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, initialized={bool(self.initialized)}"


WEIGHT_QUANTIZERS: Dict[str, Type[WeightQuantizer]] = {}
ACTIVATION_QUANTIZERS: Dict[str, Type[ActivationQuantizer]] = {}


def register_weight_quantizer(name: str) -> Callable[[Type[WeightQuantizer]], Type[WeightQuantizer]]:
    def wrap(cls):
        WEIGHT_QUANTIZERS[name] = cls
        return cls

    return wrap


def register_activation_quantizer(name: str) -> Callable[[Type[ActivationQuantizer]], Type[ActivationQuantizer]]:
    def wrap(cls):
        ACTIVATION_QUANTIZERS[name] = cls
        return cls

    return wrap


def weight_groups(config, weight_shape) -> int:
    """How many contiguous groups of the row-major flattened weight get their own table (step,
    codebook or scale), from ``config.granularity``: 1 (``per_tensor``), the output channels
    (``per_channel``), or ``rows * cols / group_size`` (``per_group``: group ``g`` holds columns
    ``[(g % (cols / G)) * G, ...+ G)`` of row ``g // (cols / G)``; ``cols`` is everything but the output
    dimension, ``in * kh * kw`` for a convolution). A weight whose ``cols`` is not a multiple of
    ``group_size`` gets one group per output channel instead (docs/methods.md), with a warning."""
    rows = int(weight_shape[0])
    cols = math.prod(int(d) for d in weight_shape[1:])
    if config.granularity == "per_tensor":
        return 1
    if config.granularity == "per_channel":
        return rows
    size = config.group_size
    if cols % size:
        warnings.warn(f"adq_hf: a weight of shape {list(weight_shape)} has {cols} columns, not a multiple of "
                      f"group_size={size}: it gets one group per output channel (groups of {cols}).", stacklevel=3)
        return rows
    return rows * (cols // size)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward (exactly), identity backward."""
    return straight_through(torch.round(x), x)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Exactly ``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``value + (surrogate - surrogate.detach())`` adds an exact zero, so a quantized value stays
    bit-identical (``surrogate + (value - surrogate).detach()`` would round), which makes a reloaded
    checkpoint reproduce outputs exactly.
    """
    return value.detach() + (surrogate - surrogate.detach())


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    return straight_through(x, x * scale)
