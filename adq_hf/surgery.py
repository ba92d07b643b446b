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
from .nn import convert_layer, init_weight_quantizer, input_channels, is_quantized_layer, quantized_class_for, quantized_layers
from .quantizers import make_activation_quantizer, make_weight_quantizer

_CLASSIFIER_NAMES = ("classifier", "score", "head", "fc")


@dataclass
class LayerPlan:
    name: str
    weight_bits: int
    activation_bits: Optional[int]
    role: str  # "first", "last" or "body"
    weight_read_by_parent: bool = False  # the parent runs the op on ``layer.weight`` itself (no input quantizer)


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


def _forward_sources(cls: type) -> str:
    """Source of the ``*forward*`` methods of a module class and its bases below ``torch.nn`` (not its
    initialisation code, which reads weights without running the layer)."""
    import inspect

    texts = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch.nn"):
            continue
        for attr, member in vars(klass).items():
            if "forward" in attr and callable(member):
                try:
                    texts.append(inspect.getsource(member))
                except (OSError, TypeError):
                    pass
    return "\n".join(texts)


def _weight_read_by_parent(model: nn.Module) -> set:
    """Linear/Conv2d layers whose parent's forward code reads ``self.<name>.weight`` (and so runs the op
    on the weight itself, bypassing the layer's forward: timm's EVA/BEiT/Swin-V2 qkv with separate q/v
    biases, MobileViT-v2's cross attention)."""
    found, sources = set(), {}
    for parent_name, parent in model.named_modules():
        children = [(a, c) for a, c in parent.named_children() if isinstance(c, (nn.Linear, nn.Conv2d))]
        if not children:
            continue
        if type(parent) not in sources:
            sources[type(parent)] = _forward_sources(type(parent))
        for attr, _ in children:
            if re.search(rf"self\.{re.escape(attr)}\.weight\b", sources[type(parent)]):
                found.add(f"{parent_name}.{attr}" if parent_name else attr)
    return found


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
    read_by_parent = _weight_read_by_parent(model)
    unused_patterns = set(config.layer_bits)
    plans, skipped, float_inputs = [], [], []
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
        elif name in read_by_parent:
            act_bits = None
            float_inputs.append(name)
        else:
            act_bits = bits if role != "body" and explicit is None else config.activation_bits
        plans.append(LayerPlan(name, bits, act_bits, role, name in read_by_parent))
    if unused_patterns:
        raise ValueError(
            f"ADQConfig.layer_bits entries {sorted(unused_patterns)} match no Linear/Conv2d layer of "
            f"{type(model).__name__}; layer names look like {[n for n, _ in candidates[:3]]}."
        )
    notes = []
    if skipped:
        notes.append("adq_hf leaves these layers in float: " + "; ".join(skipped))
    if float_inputs:
        notes.append("adq_hf quantizes only the weights of these layers, whose parent module reads their .weight "
                     "and runs the op itself, so their inputs stay float: " + ", ".join(float_inputs))
    if notes:  # one warning naming every layer that is not fully quantized
        warnings.warn(". ".join(notes) + ".", stacklevel=3)
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


def convert_model(model: nn.Module, config: ADQConfig, init_from_weights: bool = True) -> nn.Module:
    """Swap the layers :func:`plan_quantization` selects for quantized ones, in place, and
    initialise their weight quantizers from the weights (``init_from_weights=False``: the weights
    are not loaded yet: meta device, pre-quantized checkpoints).

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
        convert_layer(module, wq, aq, weight_attribute=plan.weight_read_by_parent)
        if init_from_weights and weight.device.type != "meta":
            init_weight_quantizer(module)
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


DEFAULT_CALIBRATION_BATCHES = 8


class _Observing(nn.Module):
    """Stands in for an input quantizer during calibration: records the input, passes it on unquantized
    (as the observers of torch.ao, brevitas and NNCF do), so every layer sees the float model's inputs."""

    initialized = False  # for deployed layers, which look at it before building their input form

    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.quantizer.observe(x)
        return x


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, calibration_data: Iterable, num_batches: Optional[int] = DEFAULT_CALIBRATION_BATCHES
) -> List[str]:
    """Set every not yet initialised input quantizer from up to ``num_batches`` batches (``None``: all).

    Each quantizer records its input on every batch (the model runs with float activations meanwhile),
    then sets its signedness and step with its range estimator (``ADQConfig.activation_init``:
    MSE by default; docs/methods.md). Returns the names of the layers calibrated. Run this before
    wrapping the model for DDP so every rank starts from the same values.
    """
    layers = [(name, layer) for name, layer in quantized_layers(model)
              if layer.input_quantizer is not None and not bool(layer.input_quantizer.initialized)]
    if not layers:
        return []
    was_training = model.training
    model.eval()
    for _, layer in layers:
        layer._modules["input_quantizer"] = _Observing(layer.input_quantizer)
    seen = 0
    try:
        device = next(model.parameters()).device
        for batch in calibration_data:
            if num_batches is not None and seen >= num_batches:
                break
            args, kwargs = model_inputs(batch)
            args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
            kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            model(*args, **kwargs)
            seen += 1
    finally:
        for _, layer in layers:
            layer._modules["input_quantizer"] = layer._modules["input_quantizer"].quantizer
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate_activations got no batch: pass an iterable of model inputs (tensors, "
                         "(inputs, labels) pairs or dicts), e.g. a few batches of training data.")
    calibrated, unreached = [], []
    for name, layer in layers:
        quantizer = layer.input_quantizer
        if quantizer.observed_batches == 0:
            unreached.append(name)
            continue
        quantizer.finish_calibration()
        if hasattr(layer, "prepare_input_form"):  # a deployed layer: its input quantizer's deploy form
            layer.prepare_input_form()
        calibrated.append(name)
    if unreached:
        warnings.warn(f"{len(unreached)} input quantizers saw no calibration data and stay uncalibrated (they "
                      f"initialise on their first batch): {', '.join(unreached)}.", stacklevel=2)
    return calibrated


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
