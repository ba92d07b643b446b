"""Brevitas (uniform QAT, https://github.com/Xilinx/brevitas) as B1's peer-library row.

    from brevitas_peer import convert, calibrate, bit_map, average_weight_bits
    model = timm.create_model("resnet20_cifar", in_chans=1, num_classes=10)   # + FP teacher weights
    convert(model, weight_bits=2, activation_bits=2, calibration_batches=batches)
    calibrate(model, batches)   # activation scales from the same calibration batches as our rows

Model surgery: every ``nn.Conv2d`` / ``nn.Linear`` that adq_hf's own ``quantize_model`` would
quantize (the selection and the bits come from ``adq_hf.surgery.plan_quantization`` with the same
``ADQConfig`` defaults: the first conv and the classifier at ``first_layer_bits`` /
``last_layer_bits`` = 8 bits for weights *and* input activations, every other layer at
``weight_bits`` / ``activation_bits``) is replaced by a brevitas ``QuantConv2d`` / ``QuantLinear``
holding a copy of its weight and bias. BatchNorm, ReLU, pooling and the residual adds stay float,
exactly as in our quantized layers. Nothing else of the model's code changes.

Quantizers (brevitas' stock ones, with only the bit width overridden, which is how brevitas' own
examples build low-bit models, e.g. ``brevitas_examples/imagenet_classification/models/common.py``):

* weights: ``brevitas.quant.Int8WeightPerChannelFloat`` with ``weight_bit_width=b``: signed,
  narrow-range integers (``[-(2^(b-1)-1), 2^(b-1)-1]``, so 3 levels at 2 bits), symmetric, one
  floating-point scale per output channel computed on every forward pass from the channel's max
  |w| (``ScalingImplType.STATS``, ``StatsOp.MAX``); the gradient reaches the weights through the
  straight-through round and through the max. There is no learned weight scale, so the weights are
  the only weight-side parameters (they get the recipe's ``optim.lr`` and weight decay, like ours).
* activations: brevitas ``QuantIdentity`` on each quantized layer's **input** (where our layers
  quantize too), ``brevitas.quant.Uint8ActPerTensorFloat`` (unsigned) when the layer's input is
  non-negative on the calibration batches (every ReLU output, and the classifier's average-pooled
  ReLU features) and ``brevitas.quant.Int8ActPerTensorFloat`` (signed) otherwise (the normalised
  image into the first conv), both with ``bit_width=a``: one learned floating-point scale per
  tensor (``ScalingImplType.PARAMETER_FROM_STATS``), initialised from the 99.999th percentile of
  the input. Brevitas' default collects that statistic over the first 300 training steps; here
  ``calibrate`` runs brevitas' ``calibration_mode`` over the recipe's ``calibration.num_batches``
  calibration batches instead, so the scale is learned from step 0 and starts from the same data
  our rows calibrate on (brevitas' PTQ-then-QAT flow).
* bias (only the classifier has one) and outputs: float, as in our layers.

The input quantizer is a ``QuantIdentity`` stored as ``<layer>.input_quantizer`` instead of
brevitas' built-in ``input_quant=`` argument (same maths: a fake-quantized tensor goes into the
layer) only so that the recipe's optimiser (``adq_hf.training.parameter_groups``) recognises the
learned activation scales as quantizer parameters: ``optim.quantizer_lr``, no weight decay, the
treatment our LSQ steps get. Weight names (``<layer>.weight``, ``<layer>.bias``) are unchanged.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

try:
    import brevitas
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
except ImportError as err:  # pragma: no cover - exercised only without the bench extra
    raise ImportError(
        "benchmarks/brevitas_peer.py needs brevitas: pip install -c constraints.txt -e '.[bench]'"
    ) from err

WEIGHT_QUANT = Int8WeightPerChannelFloat
SIGNED_ACT_QUANT = Int8ActPerTensorFloat
UNSIGNED_ACT_QUANT = Uint8ActPerTensorFloat
BACKEND = "brevitas"


class _InputQuantized:
    """Mixin: fake-quantize the layer input with ``input_quantizer``, then the brevitas layer."""

    weight_bits: int
    activation_bits: Optional[int]
    activation_signed: Optional[bool]

    def _init_quant(self, weight_bits: int, activation_bits: Optional[int], signed: bool) -> None:
        self.weight_bits, self.activation_bits = int(weight_bits), activation_bits
        self.activation_signed = signed if activation_bits is not None else None
        self.input_quantizer = None
        if activation_bits is not None:
            act_quant = SIGNED_ACT_QUANT if signed else UNSIGNED_ACT_QUANT
            self.input_quantizer = QuantIdentity(act_quant=act_quant, bit_width=int(activation_bits),
                                                 return_quant_tensor=False)

    def forward(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return super().forward(x)


class BrevitasConv2d(_InputQuantized, QuantConv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, activation_bits: Optional[int], signed: bool):
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
                    bias=conv.bias is not None, weight_quant=WEIGHT_QUANT, weight_bit_width=int(weight_bits),
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer._init_quant(weight_bits, activation_bits, signed)
        _copy_params(conv, layer)
        return layer


class BrevitasLinear(_InputQuantized, QuantLinear):
    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, activation_bits: Optional[int], signed: bool):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, weight_quant=WEIGHT_QUANT,
                    weight_bit_width=int(weight_bits), device=linear.weight.device, dtype=linear.weight.dtype)
        layer._init_quant(weight_bits, activation_bits, signed)
        _copy_params(linear, layer)
        return layer


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.train(src.training)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _batch_inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _input_signs(model: nn.Module, names: List[str], batches: Iterable) -> Dict[str, bool]:
    """``{layer: True}`` when the layer's float input goes below zero on any calibration batch."""
    modules = dict(model.named_modules())
    signed = {n: False for n in names}
    hooks = [modules[n].register_forward_pre_hook(
        lambda m, args, n=n: signed.__setitem__(n, signed[n] or bool(args[0].min() < 0))) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(_batch_inputs(batch).to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return signed


def plan(model: nn.Module, weight_bits: int, activation_bits: Optional[int], first_layer_bits: int = 8,
         last_layer_bits: int = 8, layer_bits: Optional[Dict[str, int]] = None):
    """adq_hf's own layer selection and bits (``adq_hf.surgery.plan_quantization``), so the
    brevitas row quantizes exactly the layers our rows do, at the same bits (``layer_bits``: a
    mixed-precision allocation, ``{module name or regex: weight bits}`` as in ``ADQConfig``)."""
    from adq_hf import ADQConfig
    from adq_hf.surgery import plan_quantization

    config = ADQConfig(weight_bits=weight_bits, activation_bits=activation_bits, first_layer_bits=first_layer_bits,
                       last_layer_bits=last_layer_bits, layer_bits=layer_bits, weight_quantizer="lsq",
                       activation_quantizer="lsq")
    return plan_quantization(model, config)


def convert(model: nn.Module, weight_bits: int, activation_bits: Optional[int], first_layer_bits: int = 8,
            last_layer_bits: int = 8, calibration_batches: Optional[Iterable] = None,
            signed: Optional[Dict[str, bool]] = None, layer_bits: Optional[Dict[str, int]] = None) -> nn.Module:
    """Replace the model's Conv2d/Linear layers (in place) by brevitas layers; returns the model.

    ``calibration_batches`` (tensors or ``(images, labels)``) decide, per layer, a signed or an
    unsigned activation quantizer from the sign of its float input; without them the first layer
    gets a signed and every other layer an unsigned quantizer (right for ReLU networks); ``signed``
    (``{layer: bool}``, e.g. ``model.brevitas_config["signed_inputs"]`` of a saved run) overrides both.
    Activation scales are not initialised here: call ``calibrate`` (or let brevitas collect them
    over its first 300 training steps).
    """
    plans = plan(model, weight_bits, activation_bits, first_layer_bits, last_layer_bits, layer_bits)
    names = [p.name for p in plans]
    if signed is not None:
        signs = {n: bool(signed[n]) for n in names}
    elif calibration_batches is not None and activation_bits is not None:
        signs = _input_signs(model, names, calibration_batches)
    else:
        signs = {p.name: p.role == "first" for p in plans}
    modules = dict(model.named_modules())
    for p in plans:
        float_layer = modules[p.name]
        cls = BrevitasConv2d if isinstance(float_layer, nn.Conv2d) else BrevitasLinear
        _set_submodule(model, p.name, cls.from_float(float_layer, p.weight_bits, p.activation_bits, signs[p.name]))
    model.brevitas_config = {"backend": BACKEND, "brevitas_version": brevitas.__version__,
                             "weight_bits": weight_bits, "activation_bits": activation_bits,
                             "first_layer_bits": first_layer_bits, "last_layer_bits": last_layer_bits,
                             "layer_bits": dict(layer_bits or {}),
                             "weight_quant": WEIGHT_QUANT.__name__, "weight_scaling": "per_channel_max_stats",
                             "signed_act_quant": SIGNED_ACT_QUANT.__name__,
                             "unsigned_act_quant": UNSIGNED_ACT_QUANT.__name__,
                             "signed_inputs": {n: signs[n] for n in names}}
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable) -> None:
    """Initialise every activation scale with brevitas' ``calibration_mode`` (stats averaged over
    ``batches``); afterwards the scales are learned parameters."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with calibration_mode(model):
            for batch in batches:
                model(_batch_inputs(batch).to(device))
    finally:
        model.train(was_training)


def quantized_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BrevitasConv2d, BrevitasLinear))]


def bit_map(model: nn.Module) -> Dict[str, Dict[str, Optional[int]]]:
    """Same shape as ``adq_hf.bit_map``: ``{layer: {"weight_bits", "activation_bits", "params"}}``."""
    return {n: {"weight_bits": m.weight_bits, "activation_bits": m.activation_bits, "params": m.weight.numel()}
            for n, m in quantized_layers(model)}


def average_weight_bits(model: nn.Module) -> float:
    """Parameter-weighted average weight bits of the quantized layers (as ``adq_hf.average_weight_bits``)."""
    bits = bit_map(model).values()
    return sum(b["weight_bits"] * b["params"] for b in bits) / max(sum(b["params"] for b in bits), 1)
