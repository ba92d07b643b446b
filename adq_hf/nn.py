"""Quantized layers: the original op with a weight quantizer and an optional input quantizer.

A layer does not know which method its quantizers implement; it only calls the interface of
``adq_hf.quantizers.base``. Layers are converted in place (``__class__`` swap), so parameter names,
hooks, devices and the meta device of transformers' loading are all kept, and the float ``weight``
stays the trainable latent weight.

Layer types (docs/methods.md, "Layer types"): ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
transformers' ``Conv1D`` (GPT-2: a Linear whose weight is stored transposed, ``[in, out]``) and
``nn.Embedding`` (weight only). Quantizers always see the weight with output channels first
(:func:`output_major`), so per-channel codebooks follow the output channel of a ``Conv1D`` too and
the packed codes of every layer are in that layout.

Subclasses: a ``Linear`` subclass with its own ``forward`` is quantized when that forward computes
``x @ W.T (+ b)``, checked on random inputs the first time the class is met (Falcon's
``FalconLinear``); timm's forward-overriding convs (``Conv2dSame``, ``StdConv2d``,
``ScaledStdConv2d`` and their ``Same``/export variants) and ``Embedding`` subclasses with their own
``forward`` (scaled or offset position/word embeddings) keep that ``forward``: their quantized class
exposes the quantized weight as ``self.weight``, so padding, weight standardisation, scaling and
offsets run exactly as before, on the quantized weight.

Tied weights: a layer whose weight is another quantized layer's (an LM head tied to the input
embedding) is a quantized layer of its own class whose ``weight_quantizer`` and latent weight *are*
the owner's (:func:`tie_layer`); the owner alone stores codes and quantizer state.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from transformers.pytorch_utils import Conv1D

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
        """The quantized weight in the layer's own layout (what ``self.weight`` is to its float class).
        A tied layer uses its owner's (and so its owner's cache). In eval mode, when no gradient can flow into it (under
        ``torch.no_grad()``/``inference_mode``, or nothing involved requires grad), it is decoded once
        and reused until the latent weight or the quantizer's state changes (docs/deploy.md)."""
        owner = self.tied_to
        if owner is not None:  # same layout (tie_layer checks it)
            return owner.quantized_weight()
        weight = self.latent_weight()
        if not self._decode_cache_applies(weight):
            return output_major(self, self.weight_quantizer(output_major(self, weight)))
        key = _decode_key(weight, self.weight_quantizer)
        cached = self.__dict__.get("_decoded")
        if cached is not None and _same_key(cached[0], key) and cached[1].is_inference() == torch.is_inference_mode_enabled():
            return cached[1]
        self.__dict__["_decoded"] = None  # free the stale copy before decoding a new one
        quantized = output_major(self, self.weight_quantizer(output_major(self, weight)))
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
        # quantizer state is float32 (docs/methods.md): a bf16/fp16 input stays in its dtype
        return x if self.input_quantizer is None else self.input_quantizer(x).to(x.dtype)

    @property
    def tied_to(self) -> Optional[nn.Module]:
        """The quantized layer whose weight and quantizer this layer uses (:func:`tie_layer`), or None."""
        return self.__dict__.get("_tied_to")

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


class QuantConv1d(QuantizedLayerMixin, nn.Conv1d):
    """``torch.nn.Conv1d`` (Whisper's and wav2vec2's audio front-ends)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


def transposed_linear_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D`` math, ``x @ weight + bias`` with ``weight`` ``[in, out]``, as ``F.linear`` on
    the contiguous output-major weight: the same kernel (so the same rounding) whatever memory layout
    the weight comes in (a quantizer's output, a decoded table)."""
    return F.linear(x, weight.t().contiguous(), layer.bias)


class QuantConv1D(QuantizedLayerMixin, Conv1D):
    """transformers' ``Conv1D`` (GPT-2; not ``nn.Conv1d``): weight ``[in, out]``, quantized output-major."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return transposed_linear_forward(self, self.quantize_input(x), self.quantized_weight())


class QuantEmbedding(QuantizedLayerMixin, nn.Embedding):
    """``nn.Embedding``: the rows looked up from the quantized table; weight only (inputs are indices)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class _QuantizedWeightAttribute(QuantizedLayerMixin):
    """For layers whose own forward must run: ``self.weight`` reads as the quantized weight."""

    @property
    def weight(self) -> torch.Tensor:
        if "weight" not in self._parameters:  # while transformers loads packed codes into a buffer: those
            if self._buffers.get("weight") is not None:
                return self._buffers["weight"]
            raise AttributeError("weight")
        return self.quantized_weight()

    def forward(self, *args, **kwargs):  # (embedding subclasses take more arguments; they have no input quantizer)
        if self.input_quantizer is not None:
            args = (self.quantize_input(args[0]),) + args[1:]
        return super().forward(*args, **kwargs)


def output_major(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with output channels on axis 0, the layout every quantizer and packed checkpoint uses:
    the transpose for transformers' ``Conv1D`` (stored ``[in, out]``; its own inverse), else ``weight``."""
    return weight.t() if isinstance(module, Conv1D) else weight


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
def init_weight_quantizer(layer: nn.Module, importance: Optional[torch.Tensor] = None) -> None:
    """Initialise a quantized layer's weight quantizer from its (loaded) latent weight, output-major
    (StdConv2d-like layers: standardised first); ``importance``: per-weight weights of the codebook fit
    (``adq_hf.importance``), or None."""
    standardise_latent_weight(layer)
    weight = output_major(layer, layer.latent_weight().detach())
    if importance is None:
        layer.weight_quantizer.init_from(weight)
    else:
        layer.weight_quantizer.init_from(weight, importance=importance)


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


# float base class -> its quantized class (subclasses: the first base that matches)
_QUANT_BASES = ((nn.Linear, QuantLinear), (nn.Conv1d, QuantConv1d), (nn.Conv2d, QuantConv2d), (Conv1D, QuantConv1D),
                (nn.Embedding, QuantEmbedding))
_QUANT_CLASSES: Dict[type, type] = dict(_QUANT_BASES)
# the float layer types adq_hf quantizes (surgery's candidates)
WEIGHT_LAYER_TYPES = tuple(base for base, _ in _QUANT_BASES)


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
    for base, quant_base in _QUANT_BASES:
        if not issubclass(cls, base):
            continue
        if cls.forward is base.forward or (base is nn.Linear and computes_linear(cls)):
            new = type(f"Quant{cls.__name__}", (quant_base, cls), {})
        elif cls in _forward_overriding_timm_layers() or base is nn.Embedding:
            new = type(f"Quant{cls.__name__}", (_QuantizedWeightAttribute, cls), {})
        else:
            return None
        _QUANT_CLASSES[cls] = _register_class(new)
        return new
    return None


_LINEAR_MATH: Dict[type, bool] = {}


def computes_linear(cls: type) -> bool:
    """Whether an ``nn.Linear`` subclass's own ``forward`` computes ``x @ W.T (+ b)``: run once per class
    on a bare instance (its ``__init__`` is not called) with random weights, with and without bias, on
    3-D float32 inputs; anything else (other results, an error, missing attributes) is ``False``."""
    if cls not in _LINEAR_MATH:
        _LINEAR_MATH[cls] = _probe_linear_math(cls)
    return _LINEAR_MATH[cls]


@torch.no_grad()
def _probe_linear_math(cls: type) -> bool:
    # explicit device and dtype: transformers builds models under a meta-device and a model-dtype default
    generator, real = torch.Generator().manual_seed(0), {"device": "cpu", "dtype": torch.float32}
    for with_bias in (True, False):
        probe = cls.__new__(cls)
        nn.Module.__init__(probe)
        probe.in_features, probe.out_features = 5, 3
        probe.weight = nn.Parameter(torch.randn(3, 5, generator=generator, **real))
        probe.bias = nn.Parameter(torch.randn(3, generator=generator, **real)) if with_bias else None
        x = torch.randn(2, 4, 5, generator=generator, **real)
        try:
            out = probe(x)
        except Exception:  # an attribute its __init__ would set, another signature: not plain math
            return False
        expected = F.linear(x, probe.weight, probe.bias)
        if not torch.is_tensor(out) or out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5):
            return False
    return True


def convert_layer(
    module: nn.Module,
    weight_quantizer: WeightQuantizer,
    input_quantizer: Optional[ActivationQuantizer] = None,
    weight_attribute: bool = False,
) -> nn.Module:
    """Turn a float layer (``WEIGHT_LAYER_TYPES``) into its quantized class in place; returns the same
    object. ``weight_attribute``: see :func:`quantized_class_for`."""
    quant_cls = quantized_class_for(type(module), weight_attribute)
    if quant_cls is None:
        raise TypeError(f"{type(module).__name__} is not a supported layer type for quantization.")
    weight = module._parameters["weight"]
    module.add_module("weight_quantizer", weight_quantizer.to(device=weight.device))
    module.add_module("input_quantizer", None if input_quantizer is None else input_quantizer.to(device=weight.device))
    module.__class__ = quant_cls
    return module


def tie_layer(module: nn.Module, owner: nn.Module, input_quantizer: Optional[ActivationQuantizer] = None) -> nn.Module:
    """Turn a float layer whose weight is ``owner``'s (a tied LM head) into its quantized class, in place,
    computing with ``owner``'s quantized weight: its ``weight_quantizer`` is the owner's (an attribute,
    not a registered submodule, so the quantizer state is stored and trained once) and its latent
    weight is the owner's parameter. Both layers must have the same weight shape and layout."""
    quant_cls = _quantized_class_or_error(module)
    if not is_quantized_layer(owner):
        raise TypeError(f"the owner of a tied weight must be a quantized layer, got {type(owner).__name__}.")
    if isinstance(module, Conv1D) != isinstance(owner, Conv1D):
        raise ValueError("a tied weight needs the same layout in both layers (transformers' Conv1D stores it transposed).")
    module.add_module("input_quantizer", None if input_quantizer is None else input_quantizer.to(
        device=owner._parameters["weight"].device))
    module.__class__ = quant_cls
    module.__dict__["weight_quantizer"] = owner.weight_quantizer
    module.__dict__["_tied_to"] = owner
    if "weight" in module._parameters and module._parameters["weight"] is not owner._parameters["weight"]:
        module._parameters["weight"] = owner._parameters["weight"]
    return module


def _quantized_class_or_error(module: nn.Module) -> type:
    quant_cls = quantized_class_for(type(module))
    if quant_cls is None:
        raise TypeError(f"{type(module).__name__} is not a supported layer type for quantization.")
    return quant_cls


def input_channels(module: nn.Module) -> Tuple[int, int]:
    """``(channel count, channel axis)`` of a layer's input: ``(in_channels, 1)`` for NC(H)W convs,
    ``(in_features, -1)`` for Linear and transformers' Conv1D (whatever the leading axes: tokens, NHWC pixels)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels, 1
    if isinstance(module, Conv1D):
        return module.nx, -1
    return module.in_features, -1


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLayerMixin)


def quantized_layers(model: nn.Module):
    """``(name, layer)`` for every quantized layer of ``model``, in registration order (tied ones too:
    ``layer.tied_to`` is set on those; :func:`weight_owners` leaves them out)."""
    return [(name, m) for name, m in model.named_modules() if is_quantized_layer(m)]


def weight_owners(model: nn.Module):
    """The quantized layers that own their weight: every quantized layer but the tied ones, so each
    stored weight counts once (bit maps, average bits, checkpoints, memory)."""
    return [(name, m) for name, m in quantized_layers(model) if m.tied_to is None]
