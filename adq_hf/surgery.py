"""Model surgery: the one place that decides which layers are quantized, at which bits, and swaps
them (``convert_model``). ``adq_hf.quantize_model`` (plan bits, convert, calibrate) calls it; timm,
transformers, the recipes and PTQ call that. Nothing here imports the planners or the integrations.

Which layers (``adq_hf.nn.WEIGHT_LAYER_TYPES``: Linear, Conv1d, Conv2d, transformers' Conv1D,
Embedding), in this order of precedence (docs/methods.md):
  1. ``modules_to_not_convert`` (names, prefixes or regexes) stay float;
  2. a ``layer_bits`` match sets the weight bits;
  3. the first layer (the first ``nn.Conv2d``/``nn.Conv1d`` in registration order: a vision model's
     stem or patch embedding, an audio model's front-end; text models have none) gets
     ``first_layer_bits``, the classifier (timm's ``get_classifier()``, transformers' output
     embeddings, or a top-level ``classifier``/``score``/``head``/``fc``) gets ``last_layer_bits``,
     ``nn.Embedding`` tables get ``embedding_bits``; ``None`` keeps them float;
  4. every other layer gets ``weight_bits``.
Input quantizers use ``activation_bits`` (first/last layers: their own bits; embeddings: none).
A weight shared by several layers (tied by identity, or declared tied by transformers, which builds
the model untied on the meta device and ties after loading) is quantized once, at the highest bits
its layers get, when none of them stays float: the first embedding among them (else the first layer)
owns it, the others compute with the owner's quantized weight (``adq_hf.nn.tie_layer``). Layers that
stay float for a reason the config does not give (a tied partner that stays float, a forward adq_hf
does not know) are named in one warning.
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
from .nn import (
    WEIGHT_LAYER_TYPES,
    convert_layer,
    init_weight_quantizer,
    input_channels,
    is_quantized_layer,
    output_major,
    quantized_class_for,
    quantized_layers,
    tie_layer,
    weight_owners,
)
from .quantizers import make_activation_quantizer, make_weight_quantizer

_CLASSIFIER_NAMES = ("classifier", "score", "head", "fc")


@dataclass
class LayerPlan:
    name: str
    weight_bits: int
    activation_bits: Optional[int]
    role: str  # "first", "last", "embedding" or "body"
    tied_to: Optional[str] = None  # the layer whose weight (and weight quantizer) this one computes with
    weight_read_by_parent: bool = False  # the parent runs the op on ``layer.weight`` itself (no input quantizer)


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES) and n]


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
        if isinstance(head, WEIGHT_LAYER_TYPES) and not isinstance(head, nn.Embedding) and id(head) in names:
            return names[id(head)]
    return None


def tied_weight_groups(model: nn.Module, candidates: List[Tuple[str, nn.Module]]) -> List[List[str]]:
    """Groups (two or more, in registration order) of candidate layers that share one weight: the
    same ``weight`` parameter, or a tie transformers declares (``all_tied_weights_keys``, ``{tied
    weight: source weight}``), which only exists after loading."""
    index = {name: i for i, (name, _) in enumerate(candidates)}
    parent = list(range(len(candidates)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        parent[root(index[a])] = root(index[b])

    first_user: Dict[int, str] = {}
    for name, module in candidates:
        weight = module._parameters.get("weight")
        if weight is not None:
            union(name, first_user.setdefault(id(weight), name))
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        target, source = target.removesuffix(".weight"), source.removesuffix(".weight")
        if target in index and source in index:
            union(target, source)
    groups: Dict[int, List[str]] = {}
    for name, _ in candidates:
        groups.setdefault(root(index[name]), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _float_reason(module: nn.Module) -> Optional[str]:
    """Why a layer of a supported type must stay float whatever the config says, or None."""
    if quantized_class_for(type(module)) is None:
        return f"{type(module).__name__}: its forward is not known to adq_hf"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "Embedding with max_norm: it renormalises its weight in place"
    return None


def _tied_plans(group, own_plans, modules, config, skipped) -> List[LayerPlan]:
    """The owner of a shared weight and the layers tied to it, from each layer's own plan, or none
    (every layer float) when one of them stays float or their weights differ in shape or layout."""
    shapes = {tuple(output_major(modules[n], modules[n]._parameters["weight"]).shape) for n in group}
    layouts = {tuple(output_major(modules[n], torch.empty(2, 3, device="meta")).shape) for n in group}
    if len(shapes) > 1 or len(layouts) > 1:
        skipped.extend(f"{n} (weight tied across {', '.join(group)} in different shapes or layouts)" for n in group)
        return []
    floats = [n for n in group if n not in own_plans]
    if floats:
        by_default = config.embedding_bits is None and any(
            isinstance(modules[n], nn.Embedding) and config.bits_for(n) is None and not config.is_excluded(n)
            and _float_reason(modules[n]) is None for n in floats)
        hint = "; set ADQConfig.embedding_bits to quantize the tied weight once for all of them" if by_default else ""
        skipped.extend(f"{n} (weight tied to {', '.join(floats)}, which stays float{hint})"
                       for n in group if n in own_plans)
        return []
    owner = next((n for n in group if isinstance(modules[n], nn.Embedding)), group[0])
    bits = max(own_plans[n].weight_bits for n in group)
    plans = []
    for name in [owner] + [n for n in group if n != owner]:
        plan = own_plans[name]
        plans.append(LayerPlan(name, bits, plan.activation_bits, plan.role, None if name == owner else owner))
    return plans


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
    """Layers whose parent's forward code reads ``self.<name>.weight`` (and so runs the op
    on the weight itself, bypassing the layer's forward: timm's EVA/BEiT/Swin-V2 qkv with separate q/v
    biases, MobileViT-v2's cross attention)."""
    found, sources = set(), {}
    for parent_name, parent in model.named_modules():
        children = [(a, c) for a, c in parent.named_children() if isinstance(c, WEIGHT_LAYER_TYPES)]
        if not children:
            continue
        if type(parent) not in sources:
            sources[type(parent)] = _forward_sources(type(parent))
        for attr, _ in children:
            if re.search(rf"self\.{re.escape(attr)}\.weight\b", sources[type(parent)]):
                found.add(f"{parent_name}.{attr}" if parent_name else attr)
    return found


def plan_quantization(model: nn.Module, config: ADQConfig) -> List[LayerPlan]:
    """Which layers get quantized at which bits (owners before the layers tied to them); warns about
    layers it must leave float."""
    candidates = [(n, m) for n, m in _candidates(model) if not is_quantized_layer(m)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no layer to quantize (adq_hf quantizes Linear, Conv1d, Conv2d, "
            "transformers' Conv1D and Embedding layers, and subclasses with the same math)."
        )
    names = {id(m): n for n, m in candidates}
    modules = dict(candidates)
    first = next((n for n, m in candidates if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
    last = _classifier_name(model, names)
    unused_patterns = set(config.layer_bits)
    own_plans: Dict[str, LayerPlan] = {}  # what each layer would get on its own; None: float
    float_reasons, skipped, float_inputs = {}, [], []
    read_by_parent = _weight_read_by_parent(model)
    for name, module in candidates:
        explicit = config.bits_for(name)
        if explicit is not None:
            unused_patterns.discard(next(p for p in config.layer_bits if p == name or re.fullmatch(p, name)))
        if config.is_excluded(name):
            continue
        reason = _float_reason(module)
        if reason is not None:
            float_reasons[name] = reason
            continue
        embedding = isinstance(module, nn.Embedding)
        role = "first" if name == first else "last" if name == last else "embedding" if embedding else "body"
        if explicit is not None:
            bits = explicit
        else:
            bits = {"first": config.first_layer_bits, "last": config.last_layer_bits,
                    "embedding": config.embedding_bits}.get(role, config.weight_bits)
        if bits is None:
            continue
        if config.activation_bits is None or embedding:
            act_bits = None
        elif name in read_by_parent:
            act_bits = None
            float_inputs.append(name)
        else:
            act_bits = bits if role != "body" and explicit is None else config.activation_bits
        own_plans[name] = LayerPlan(name, bits, act_bits, role, weight_read_by_parent=name in read_by_parent)
    plans = dict(own_plans)
    tied_plans = []
    for group in tied_weight_groups(model, candidates):
        for name in group:
            plans.pop(name, None)
        tied_plans.extend(_tied_plans(group, own_plans, modules, config, skipped))
    skipped = [f"{n} ({r})" for n, r in float_reasons.items()] + skipped
    if unused_patterns:
        raise ValueError(
            f"ADQConfig.layer_bits entries {sorted(unused_patterns)} match no quantizable layer of "
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
    owners = [p for p in tied_plans if p.tied_to is None]
    ordered = list(plans.values()) + owners + [p for p in tied_plans if p.tied_to is not None]
    if not ordered:
        raise ValueError("ADQConfig selects no layer for quantization (everything is excluded or kept float).")
    return ordered


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
        aq = None
        if plan.activation_bits is not None:  # quantizer state is float32 whatever the model's dtype (docs/methods.md)
            aq = make_activation_quantizer(config, plan.activation_bits, *input_channels(module)).float()
        if plan.tied_to is not None:
            tie_layer(module, modules[plan.tied_to], aq)
            continue
        weight = output_major(module, module._parameters["weight"])
        wq = make_weight_quantizer(config, plan.weight_bits, weight.shape).state_in_float32()
        convert_layer(module, wq, aq, weight_attribute=plan.weight_read_by_parent)
        if init_from_weights and weight.device.type != "meta":
            init_weight_quantizer(module, None if importance is None else importance.get(plan.name))
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
    """``{layer: {"weight_bits", "activation_bits", "params"}}`` of a quantized model; a tied weight
    appears once, under the layer that owns it."""
    return {
        name: {
            "weight_bits": m.weight_bits,
            "activation_bits": m.activation_bits,
            "params": m.weight_numel,
        }
        for name, m in weight_owners(model)
    }


def average_weight_bits(model: nn.Module, include_float: bool = False) -> float:
    """Parameter-weighted average bits of the quantized layers' weights (docs/methods.md), each
    weight counted once (a tied weight under its owner; embeddings included when quantized).

    ``include_float=True`` also counts every other weight of a quantizable layer type at 32 bits.
    """
    total_bits = total_params = 0
    owners = weight_owners(model)
    for _, m in owners:
        total_bits += m.weight_numel * m.weight_bits
        total_params += m.weight_numel
    if include_float:
        seen = {id(m._parameters.get("weight")) for _, m in owners}
        for _, m in _candidates(model):
            weight = m._parameters.get("weight")
            if is_quantized_layer(m) or weight is None or id(weight) in seen:
                continue
            seen.add(id(weight))
            total_bits += weight.numel() * 32
            total_params += weight.numel()
    return total_bits / max(total_params, 1)
