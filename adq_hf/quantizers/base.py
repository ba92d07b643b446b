"""The small interface every quantizer implements, and the name registry.

Quantized layers (``adq_hf.nn``) only talk to this interface, so a new method is one new file
plus one ``register_*_quantizer`` call; nothing else in the package changes.
"""

from __future__ import annotations

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
