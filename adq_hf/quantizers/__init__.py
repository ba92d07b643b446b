"""Quantizers behind one interface (``base.py``) and a name registry.

``make_weight_quantizer(config, bits, weight_shape)`` and
``make_activation_quantizer(config, bits, in_features, channel_dim)`` are the only way the rest of
the package builds a quantizer, so a method is chosen by name in ``ADQConfig`` and nowhere else.
"""

from .base import (
    ACTIVATION_QUANTIZERS,
    RANGE_ESTIMATORS,
    WEIGHT_QUANTIZERS,
    ActivationQuantizer,
    WeightQuantizer,
    register_activation_quantizer,
    register_weight_quantizer,
)
from . import asq, codebook, lsq, n2uq, post  # noqa: F401  (registration side effect)
from .asq import ASQActivationQuantizer
from .codebook import CodebookWeightQuantizer
from .lsq import LSQActivationQuantizer, LSQWeightQuantizer
from .n2uq import N2UQActivationQuantizer
from .post import POSTWeightQuantizer


def make_weight_quantizer(config, bits: int, weight_shape) -> WeightQuantizer:
    cls = WEIGHT_QUANTIZERS[config.weight_quantizer]
    if hasattr(cls, "from_config"):
        return cls.from_config(config, bits, tuple(weight_shape))
    return cls(bits)


def make_activation_quantizer(config, bits: int, in_features=None, channel_dim: int = -1) -> ActivationQuantizer:
    """``in_features``: the layer's input channel count, on axis ``channel_dim`` of its input (1 for
    Conv2d's NCHW, -1 for Linear); only quantizers with a ``from_config`` (ASQ's adapter) use them."""
    cls = ACTIVATION_QUANTIZERS[config.activation_quantizer]
    if hasattr(cls, "from_config"):
        quantizer = cls.from_config(config, bits, in_features=in_features, channel_dim=channel_dim)
    else:
        quantizer = cls(bits)
    quantizer.range_estimator = config.range_estimator_for(bits)
    return quantizer


__all__ = [
    "ACTIVATION_QUANTIZERS",
    "RANGE_ESTIMATORS",
    "WEIGHT_QUANTIZERS",
    "ActivationQuantizer",
    "WeightQuantizer",
    "ASQActivationQuantizer",
    "CodebookWeightQuantizer",
    "LSQWeightQuantizer",
    "LSQActivationQuantizer",
    "N2UQActivationQuantizer",
    "POSTWeightQuantizer",
    "make_weight_quantizer",
    "make_activation_quantizer",
    "register_weight_quantizer",
    "register_activation_quantizer",
]
