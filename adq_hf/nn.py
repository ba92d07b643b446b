"""Quantized layers: the original op with a weight quantizer and an optional input quantizer.

A layer does not know which method its quantizers implement; it only calls the interface of
``adq_hf.quantizers.base``. Layers are converted in place (``__class__`` swap), so parameter names,
hooks, devices and the meta device of transformers' loading are all kept, and the float ``weight``
stays the trainable latent weight.

timm's forward-overriding subclasses (``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d`` and their
``Same``/export variants) keep their own ``forward``: their quantized class exposes the quantized
weight as ``self.weight``, so padding and weight standardisation run exactly as before, on the
quantized weight.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer


class QuantizedLayerMixin:
    """Shared by every quantized layer: its quantizers and the quantized weight."""

    weight_quantizer: WeightQuantizer
    input_quantizer: Optional[ActivationQuantizer]

    def latent_weight(self) -> torch.Tensor:
        """The float weight the optimiser trains (``_parameters`` so a ``weight`` property can't shadow it)."""
        return self._parameters["weight"]

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.latent_weight())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @property
    def weight_numel(self) -> int:
        """Number of weights (also for deployed layers, which keep only packed codes)."""
        return self._parameters["weight"].numel()

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def activation_bits(self) -> Optional[int]:
        return None if self.input_quantizer is None else self.input_quantizer.bits


class QuantLinear(QuantizedLayerMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantizedLayerMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class _QuantizedWeightAttribute(QuantizedLayerMixin):
    """For layers whose own forward must run: ``self.weight`` reads as the quantized weight."""

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.quantize_input(x))


def _forward_overriding_timm_layers():
    import importlib

    try:  # modules by path: ``timm.layers.conv2d_same`` is also the name of a function there
        conv2d_same = importlib.import_module("timm.layers.conv2d_same")
        std_conv = importlib.import_module("timm.layers.std_conv")
    except ImportError:  # timm is a dependency, but keep nn usable without it
        return ()
    names = ("Conv2dSame", "Conv2dSameExport")
    std = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
    return tuple(getattr(conv2d_same, n) for n in names if hasattr(conv2d_same, n)) + tuple(
        getattr(std_conv, n) for n in std if hasattr(std_conv, n)
    )


_QUANT_CLASSES: Dict[type, type] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def _register_class(cls: type) -> type:
    """Make a dynamically created class importable by name (pickling, repr)."""
    cls.__module__ = __name__
    if cls.__name__ in globals():  # timm.layers.Linear is also called "Linear": keep our QuantLinear
        float_cls = cls.__bases__[-1]
        cls.__name__ = cls.__qualname__ = f"Quant_{float_cls.__module__.replace('.', '_')}_{float_cls.__name__}"
    globals()[cls.__name__] = cls
    return cls


def quantized_class_for(cls: Type[nn.Module]) -> Optional[type]:
    """The quantized class for a float layer class, or ``None`` when its math can't be kept exactly."""
    if cls in _QUANT_CLASSES:
        return _QUANT_CLASSES[cls]
    if issubclass(cls, QuantizedLayerMixin):
        return None
    for base, quant_base in ((nn.Linear, QuantLinear), (nn.Conv2d, QuantConv2d)):
        if not issubclass(cls, base):
            continue
        if cls.forward is base.forward or _same_math_as_base(cls):
            new = type(f"Quant{cls.__name__}", (quant_base, cls), {})
        elif cls in _forward_overriding_timm_layers():
            new = type(f"Quant{cls.__name__}", (_QuantizedWeightAttribute, cls), {})
        else:
            return None
        _QUANT_CLASSES[cls] = _register_class(new)
        return new
    return None


def _same_math_as_base(cls: type) -> bool:
    """timm.layers.Linear overrides forward only for TorchScript dtype handling: same math."""
    try:
        from timm.layers import Linear as TimmLinear
    except ImportError:
        return False
    return cls is TimmLinear


def convert_layer(
    module: nn.Module,
    weight_quantizer: WeightQuantizer,
    input_quantizer: Optional[ActivationQuantizer] = None,
) -> nn.Module:
    """Turn a float Linear/Conv2d into its quantized class in place; returns the same object."""
    quant_cls = quantized_class_for(type(module))
    if quant_cls is None:
        raise TypeError(f"{type(module).__name__} is not a supported layer type for quantization.")
    weight = module._parameters["weight"]
    module.add_module("weight_quantizer", weight_quantizer.to(device=weight.device))
    module.add_module("input_quantizer", None if input_quantizer is None else input_quantizer.to(device=weight.device))
    module.__class__ = quant_cls
    return module


def input_channels(module: nn.Module) -> Tuple[int, int]:
    """``(channel count, channel axis)`` of a Linear/Conv2d input: ``(in_channels, 1)`` for NCHW
    convs, ``(in_features, -1)`` for Linear (whatever its leading axes: tokens, NHWC pixels)."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, 1
    return module.in_features, -1


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLayerMixin)


def quantized_layers(model: nn.Module):
    """``(name, layer)`` for every quantized layer of ``model``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if is_quantized_layer(m)]
