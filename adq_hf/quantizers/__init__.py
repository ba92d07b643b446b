"""Quantizers behind one interface (``base.py``) and a name registry.

``make_weight_quantizer(config, bits, weight_shape)`` and ``make_activation_quantizer(config, bits)``
are the only way the rest of the package builds a quantizer, so a method is chosen by name in
``ADQConfig`` and nowhere else.
"""

from .base import (
    ACTIVATION_QUANTIZERS,
    WEIGHT_QUANTIZERS,
    ActivationQuantizer,
    WeightQuantizer,
    register_activation_quantizer,
    register_weight_quantizer,
)
from . import codebook, lsq, n2uq  # noqa: F401  (registration side effect)
from .codebook import CodebookWeightQuantizer
from .lsq import LSQActivationQuantizer, LSQWeightQuantizer
from .n2uq import N2UQActivationQuantizer


def make_weight_quantizer(config, bits: int, weight_shape) -> WeightQuantizer:
    cls = WEIGHT_QUANTIZERS[config.weight_quantizer]
    if hasattr(cls, "from_config"):
        return cls.from_config(config, bits, tuple(weight_shape))
    return cls(bits)


def make_activation_quantizer(config, bits: int) -> ActivationQuantizer:
    cls = ACTIVATION_QUANTIZERS[config.activation_quantizer]
    if hasattr(cls, "from_config"):
        return cls.from_config(config, bits)
    return cls(bits)


__all__ = [
    "ACTIVATION_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
    "ActivationQuantizer",
    "WeightQuantizer",
    "CodebookWeightQuantizer",
    "LSQWeightQuantizer",
    "LSQActivationQuantizer",
    "N2UQActivationQuantizer",
    "make_weight_quantizer",
    "make_activation_quantizer",
    "register_weight_quantizer",
    "register_activation_quantizer",
]
