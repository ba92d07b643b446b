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


MAX_STANDARDISE_CHANGE = 1e-4  # relative change of a StdConv2d weight that standardising its latent may cause (below 8-bit noise)


def _weight_standardising_timm_layers():
    try:
        std_conv = __import__("importlib").import_module("timm.layers.std_conv")
    except ImportError:
        return ()
    names = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
    return tuple(getattr(std_conv, n) for n in names if hasattr(std_conv, n))


@torch.no_grad()
def standardise_latent_weight(layer: nn.Module) -> None:
    """For weight-standardising convs (timm's ``StdConv2d``, ``ScaledStdConv2d`` and their ``Same``
    forms: BiT, NFNet): make each output channel of the latent weight zero-mean with unit variance.

    Such a conv uses ``(W_c - mean_c) / sqrt(var_c + eps)``, so the float model ignores each channel's
    mean and (up to ``eps``) its scale, while a codebook or step shared by the channels does not: on
    raw weights it spends levels on offsets and scales the conv throws away. Standardising the
    latent weight once, before the quantizer is initialised, makes the quantizer see the weight the
    conv uses (docs/methods.md has the measurement). The mean removal is exact. The rescale changes
    the conv's weight by ``eps / (2 var_c)`` relative: ``ScaledStdConv2d`` compensates it in its
    ``gain``; a ``StdConv2d`` (no gain) is rescaled only where that change stays below
    ``MAX_STANDARDISE_CHANGE`` (BiT's ``eps=1e-8``: typically), otherwise only its means are removed.
    Other layers: no-op.
    """
    if not isinstance(layer, _weight_standardising_timm_layers()):
        return
    weight = layer._parameters["weight"]
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    centred = rows - rows.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1, keepdim=True)
    live = var > 0  # a constant channel (zero-initialised) stays zero
    unit = torch.where(live, centred / var.sqrt().clamp(min=1e-300), centred)
    # per channel: the conv's weight is (W - mean) / sqrt(var + eps) before, unit / sqrt(1 + eps) after
    factor = torch.where(live, var.sqrt() * torch.sqrt((1.0 + layer.eps) / (var + layer.eps)), torch.ones_like(var))
    if getattr(layer, "gain", None) is not None:
        layer.gain.mul_(factor.reshape(layer.gain.shape).to(layer.gain.dtype))
    elif float((factor - 1).abs().max()) > MAX_STANDARDISE_CHANGE:
        unit = centred
    weight.copy_(unit.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def init_weight_quantizer(layer: nn.Module) -> None:
    """Initialise a quantized layer's weight quantizer from its (loaded) latent weight."""
    standardise_latent_weight(layer)
    layer.weight_quantizer.init_from(layer.latent_weight().detach())


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


_WEIGHT_ATTRIBUTE_CLASSES: Dict[type, type] = {}


def quantized_class_for(cls: Type[nn.Module], weight_attribute: bool = False) -> Optional[type]:
    """The quantized class for a float layer class, or ``None`` when its math can't be kept exactly.

    ``weight_attribute=True``: a class whose ``weight`` attribute reads as the quantized weight, for
    layers whose parent module reads ``layer.weight`` and runs the op itself (timm's EVA, BEiT and
    Swin-V2 attention: ``F.linear(x, self.qkv.weight, qkv_bias)``); the layer's own forward is the
    float class's, on that weight.
    """
    quant_cls = _quantized_class(cls)
    if not weight_attribute or quant_cls is None or issubclass(quant_cls, _QuantizedWeightAttribute):
        return quant_cls
    if cls not in _WEIGHT_ATTRIBUTE_CLASSES:
        new = type(f"Quant{cls.__name__}WeightAttribute", (_QuantizedWeightAttribute, cls), {})
        _WEIGHT_ATTRIBUTE_CLASSES[cls] = _register_class(new)
    return _WEIGHT_ATTRIBUTE_CLASSES[cls]


def _quantized_class(cls: Type[nn.Module]) -> Optional[type]:
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
    weight_attribute: bool = False,
) -> nn.Module:
    """Turn a float Linear/Conv2d into its quantized class in place; returns the same object.
    ``weight_attribute``: see :func:`quantized_class_for`."""
    quant_cls = quantized_class_for(type(module), weight_attribute)
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
