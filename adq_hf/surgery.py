"""Model surgery: the one place that decides which layers are quantized, at which bits, and swaps
them (``convert_model``). ``adq_hf.quantize_model`` (plan bits, convert, calibrate) calls it; timm,
transformers, the recipes and PTQ call that. Nothing here imports the planners or the integrations.

Which layers (in this order of precedence, docs/methods.md):
  1. ``modules_to_not_convert`` (names, prefixes or regexes) stay float;
  2. a ``layer_bits`` match sets the weight bits;
  3. the first layer (the first ``nn.Conv2d`` in registration order: a vision model's stem or patch
     embedding; text models have none) gets ``first_layer_bits``, the classifier (timm's
     ``get_classifier()``, transformers' output embeddings, or a top-level ``classifier``/``score``/
     ``head``/``fc``) gets ``last_layer_bits``; ``None`` keeps them float;
  4. every other ``nn.Linear``/``nn.Conv2d`` gets ``weight_bits``.
Input quantizers use ``activation_bits`` (first/last layers: their own bits); none when it is None.
Layers whose weight is tied to another module, and subclasses whose forward changes the math in a
way adq_hf does not know, stay float with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .config import ADQConfig
from .nn import convert_layer, input_channels, is_quantized_layer, quantized_class_for, quantized_layers
from .quantizers import make_activation_quantizer, make_weight_quantizer

_CLASSIFIER_NAMES = ("classifier", "score", "head", "fc")


@dataclass
class LayerPlan:
    name: str
    weight_bits: int
    activation_bits: Optional[int]
    role: str  # "first", "last" or "body"


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _classifier_name(model: nn.Module, names: Dict[int, str]) -> Optional[str]:
    heads = []
    # transformers' TimmWrapper* models hold the timm model (and its classifier) in ``timm_model``
    for owner in (model, getattr(model, "timm_model", None)):
        for getter in ("get_classifier", "get_output_embeddings"):
            if owner is not None and hasattr(owner, getter):
                try:
                    heads.append(getattr(owner, getter)())
                except Exception:  # timm models without a classifier raise or return Identity
                    pass
    heads.extend(getattr(model, n, None) for n in _CLASSIFIER_NAMES)
    for head in heads:
        if isinstance(head, (nn.Linear, nn.Conv2d)) and id(head) in names:
            return names[id(head)]
    return None


def _tied_weight_ids(model: nn.Module) -> set:
    """Parameters registered in more than one module (tied embeddings / LM heads)."""
    owners: Dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}


def plan_quantization(model: nn.Module, config: ADQConfig) -> List[LayerPlan]:
    """Which layers get quantized at which bits; warns about layers it must leave float."""
    candidates = [(n, m) for n, m in _candidates(model) if not is_quantized_layer(m)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to quantize "
            "(adq_hf quantizes Linear and Conv2d layers, and their timm subclasses)."
        )
    names = {id(m): n for n, m in candidates}
    first = next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None)
    last = _classifier_name(model, names)
    tied = _tied_weight_ids(model)
    unused_patterns = set(config.layer_bits)
    plans, skipped = [], []
    for name, module in candidates:
        explicit = config.bits_for(name)
        if explicit is not None:
            unused_patterns.discard(next(p for p in config.layer_bits if p == name or re.fullmatch(p, name)))
        if config.is_excluded(name):
            continue
        if quantized_class_for(type(module)) is None:
            skipped.append(f"{name} ({type(module).__name__}: its forward is not known to adq_hf)")
            continue
        if id(module._parameters["weight"]) in tied:
            skipped.append(f"{name} (weight tied to another module)")
            continue
        role = "first" if name == first else "last" if name == last else "body"
        if explicit is not None:
            bits = explicit
        elif role == "first":
            bits = config.first_layer_bits
        elif role == "last":
            bits = config.last_layer_bits
        else:
            bits = config.weight_bits
        if bits is None:
            continue
        if config.activation_bits is None:
            act_bits = None
        else:
            act_bits = bits if role != "body" and explicit is None else config.activation_bits
        plans.append(LayerPlan(name, bits, act_bits, role))
    if unused_patterns:
        raise ValueError(
            f"ADQConfig.layer_bits entries {sorted(unused_patterns)} match no Linear/Conv2d layer of "
            f"{type(model).__name__}; layer names look like {[n for n, _ in candidates[:3]]}."
        )
    if skipped:
        warnings.warn("adq_hf leaves these layers in float: " + "; ".join(skipped), stacklevel=3)
    if not plans:
        raise ValueError("ADQConfig selects no layer for quantization (everything is excluded or kept float).")
    return plans


# Called with (model, config) after every conversion: the integrations register here (transformers'
# ``attach_quantizer``), so surgery never imports them.
POST_CONVERT_HOOKS: List[Callable[[nn.Module, ADQConfig], None]] = []


def register_post_convert_hook(hook: Callable[[nn.Module, ADQConfig], None]) -> None:
    """Run ``hook(model, config)`` after :func:`convert_model` (idempotent per hook)."""
    if hook not in POST_CONVERT_HOOKS:
        POST_CONVERT_HOOKS.append(hook)


def convert_model(model: nn.Module, config: ADQConfig, init_from_weights: bool = True,
                  importance: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """Swap the layers :func:`plan_quantization` selects for quantized ones, in place, and
    initialise their weight quantizers from the weights (``init_from_weights=False``: the weights
    are not loaded yet: meta device, pre-quantized checkpoints). ``importance`` (``{layer name:
    tensor like its weight}``) weights the fit of the layers it names (ADQ codebooks).

    The bits come from ``config`` as it is: a mixed-precision budget (``target_avg_bits``) must have
    been turned into ``layer_bits`` before (``adq_hf.quantize_model`` does it).
    """
    if not isinstance(config, ADQConfig):
        raise TypeError(f"quantize_model expects an adq_hf.ADQConfig, got {type(config).__name__}.")
    if config.target_avg_bits is not None and not config.layer_bits:
        raise ValueError(
            f"ADQConfig.target_avg_bits={config.target_avg_bits} has no bit map yet: use adq_hf.quantize_model(model, "
            "config, calibration_data=...) (it allocates the bits first), or give layer_bits explicitly."
        )
    modules = dict(model.named_modules())
    for plan in plan_quantization(model, config):
        module = modules[plan.name]
        weight = module._parameters["weight"]
        wq = make_weight_quantizer(config, plan.weight_bits, weight.shape)
        aq = None
        if plan.activation_bits is not None:
            aq = make_activation_quantizer(config, plan.activation_bits, *input_channels(module))
        if init_from_weights and weight.device.type != "meta":
            if importance is not None and plan.name in importance:
                wq.init_from(weight.detach(), importance=importance[plan.name])
            else:
                wq.init_from(weight.detach())
        convert_layer(module, wq, aq)
    model.quantization_config = config
    for hook in POST_CONVERT_HOOKS:
        hook(model, config)
    return model


def model_inputs(batch):
    """The model-input part of a batch: a tensor, ``(inputs, labels)`` or a mapping of inputs (a
    tokenizer's ``BatchEncoding`` too)."""
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    return (batch,), {}


@torch.no_grad()
def calibrate_activations(model: nn.Module, calibration_data: Iterable, num_batches: int = 1) -> None:
    """Initialise every not yet initialised input quantizer from ``num_batches`` batches.

    Run this before wrapping the model for DDP so every rank starts from the same values.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i, batch in enumerate(calibration_data):
            if i >= num_batches:
                break
            args, kwargs = model_inputs(batch)
            args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
            kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            model(*args, **kwargs)
    finally:
        model.train(was_training)


def bit_map(model: nn.Module) -> Dict[str, Dict[str, Optional[int]]]:
    """``{layer: {"weight_bits", "activation_bits", "params"}}`` of a quantized model."""
    return {
        name: {
            "weight_bits": m.weight_bits,
            "activation_bits": m.activation_bits,
            "params": m.weight_numel,
        }
        for name, m in quantized_layers(model)
    }


def average_weight_bits(model: nn.Module, include_float: bool = False) -> float:
    """Parameter-weighted average bits of the quantized layers' weights (docs/methods.md).

    ``include_float=True`` also counts every other Linear/Conv2d weight at 32 bits.
    """
    total_bits = total_params = 0
    for name, m in _candidates(model):
        n = m.weight_numel if is_quantized_layer(m) else m._parameters["weight"].numel()
        if is_quantized_layer(m):
            total_bits += n * m.weight_bits
        elif include_float:
            total_bits += n * 32
        else:
            continue
        total_params += n
    return total_bits / max(total_params, 1)
