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

    # Whether an eval-mode forward that needs no autograd graph may reuse the decoded weight
    # (``set_decode_cache``); the class default, overridden per layer in ``__dict__``.
    decode_cache: bool = True

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight. In eval mode, when no gradient can flow into it (under
        ``torch.no_grad()``/``inference_mode``, or nothing involved requires grad), it is decoded once
        and reused until the latent weight or the quantizer's state changes (docs/deploy.md)."""
        weight = self.latent_weight()
        if not self._decode_cache_applies(weight):
            return self.weight_quantizer(weight)
        key = _decode_key(weight, self.weight_quantizer)
        cached = self.__dict__.get("_decoded")
        if cached is not None and _same_key(cached[0], key) and cached[1].is_inference() == torch.is_inference_mode_enabled():
            return cached[1]
        self.__dict__["_decoded"] = None  # free the stale copy before decoding a new one
        quantized = self.weight_quantizer(weight)
        self.__dict__["_decoded"] = (key, quantized)
        return quantized

    def _decode_cache_applies(self, weight: torch.Tensor) -> bool:
        if self.training or not self.decode_cache or torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        return not (weight.requires_grad or any(p.requires_grad for p in self.weight_quantizer.parameters()))

    def clear_decoded_weight(self) -> None:
        self.__dict__.pop("_decoded", None)

    def train(self, mode: bool = True):
        if mode:
            self.clear_decoded_weight()  # training changes the weights: never reuse, and free the copy
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.clear_decoded_weight()  # .to()/.half()/.cuda(): the weight moves or changes dtype
        return super()._apply(fn, recurse)

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


def _decode_key(weight: torch.Tensor, quantizer: nn.Module) -> tuple:
    """What the decoded weight depends on: the latent weight and every tensor of the quantizer's state,
    each by identity, storage and in-place version counter (``copy_``, optimiser steps and
    ``load_state_dict`` all bump it), and the quantizer object itself. Holds references, so an
    identity cannot be reused by a new object while the key lives."""
    tensors = [weight, *quantizer.parameters(), *quantizer.buffers()]
    return (quantizer, tuple((t, t._version, t.data_ptr()) for t in tensors))


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and len(a[1]) == len(b[1]) and all(
        x[0] is y[0] and x[1] == y[1] and x[2] == y[2] for x, y in zip(a[1], b[1]))


def set_decode_cache(model: nn.Module, enabled: bool) -> int:
    """Allow (default) or forbid the eval-mode decoded-weight cache on every quantized layer of
    ``model``; forbidding also frees the cached copies. Returns how many layers were set."""
    layers = quantized_layers(model)
    for _, layer in layers:
        layer.__dict__["decode_cache"] = bool(enabled)
        if not enabled:
            layer.clear_decoded_weight()
    return len(layers)


def decoded_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the eval-mode decoded-weight caches of ``model``'s quantized layers."""
    total = 0
    for _, layer in quantized_layers(model):
        cached = layer.__dict__.get("_decoded")
        if cached is not None:
            total += cached[1].numel() * cached[1].element_size()
    return total


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
