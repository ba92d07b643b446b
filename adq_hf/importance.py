"""Per-weight importance from calibration data, for sensitivity-weighted codebooks.

A codebook fitted by plain k-means (Lloyd) spends its levels where most weights are; the output of a
layer does not care about every weight alike. Weighting each weight's squared error by an importance
``a_ij`` (SqueezeLLM's weighted k-means: ``sum_ij a_ij (w_ij - q_ij)^2``) puts the levels where the
loss is sensitive. Two importances (``ADQConfig.codebook_weighting``, docs/methods.md):

* ``"hessian"``: ``a_ij = E[x_j^2]``, the diagonal of the layer's input Hessian ``H = 2/N X X^T`` that PTQ
  collects (over 2): the output error ``||(W - Q) X||^2`` with ``H``'s off-diagonal dropped. Label-free,
  one forward pass (padding tokens left out, as in PTQ).
* ``"fisher"``: ``a_ij = E[g_ij^2]``, squared gradients per weight: of the model's loss when batches
  carry labels (the empirical Fisher), otherwise of ``<y, r>`` for a random sign vector ``r`` over the
  output ``y`` (logits or last hidden state, padding masked), whose expected square is the diagonal of
  the Gauss-Newton matrix ``J^T J`` of the output's distortion.

Only the relative importance within a table's weights matters to the fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .nn import is_quantized_layer, quantized_layers
from .surgery import model_inputs

METHODS = ("hessian", "fisher")


def _layers(model: nn.Module, names: Optional[List[str]]) -> Dict[str, nn.Module]:
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n}
    if names is None:
        return modules
    unknown = sorted(set(names) - set(modules))
    if unknown:
        raise ValueError(f"layers {unknown[:5]} are not Linear/Conv2d layers of the model.")
    return {n: modules[n] for n in names}


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


def _run(model: nn.Module, batch):
    device = next(model.parameters()).device
    args, kwargs = model_inputs(batch)
    return model(*(_to(a, device) for a in args), **{k: _to(v, device) for k, v in kwargs.items()})


def _has_labels(batch) -> bool:
    if isinstance(batch, Mapping):
        return "labels" in batch or "label" in batch
    return isinstance(batch, (tuple, list)) and len(batch) > 1


@torch.no_grad()
def input_second_moments(model: nn.Module, batches: List, layers: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``{layer: E[x_j^2]}`` (``[cols]``, float64) of each layer's input columns (after its input
    quantizer when it is quantized; convolutions unfolded), real tokens only."""
    from .ptq import layer_input_rows, token_mask

    sums = {n: None for n in layers}
    counts = dict.fromkeys(layers, 0)
    mask = {"value": None}

    def hook(name):
        def record(module, args):
            x = module.quantize_input(args[0]) if is_quantized_layer(module) else args[0]
            if isinstance(module, nn.Linear) and mask["value"] is not None and x.dim() == 3 and \
                    x.shape[:2] == mask["value"].shape:
                x = x[mask["value"].to(x.device)]
            rows = layer_input_rows(module, x).to(torch.float64)
            total = rows.pow(2).sum(dim=0)
            sums[name] = total if sums[name] is None else sums[name] + total
            counts[name] += rows.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask["value"] = token_mask(batch)
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ValueError(f"the calibration data never reached {missing[:3]}: pass batches of this model's inputs.")
    return {n: sums[n] / counts[n] for n in layers}


def squared_gradients(model: nn.Module, batches: List, layers: Dict[str, nn.Module], probes: int = 1,
                      seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{layer: E[g^2]}`` (like the weight, float64): per weight, the mean squared gradient of the loss
    (batches with labels) or of ``<y, r>`` over ``probes`` random sign vectors ``r`` (label-free)."""
    from .mixed_precision.sensitivity import default_loss

    params = {n: m._parameters["weight"] for n, m in layers.items()}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
    requires = {n: p.requires_grad for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            for _ in range(1 if _has_labels(batch) else probes):
                loss = default_loss(model, batch) if _has_labels(batch) else _probe(model, batch, generator)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        sums[name] += g.detach().to(torch.float64).pow(2)
                count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return {n: s / count for n, s in sums.items()}


def _probe(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    """``<y, r>`` for the model output ``y`` (logits / last hidden state) and random signs ``r``; padding
    positions (``attention_mask`` 0) get no sign."""
    output = _run(model, batch)
    if not torch.is_tensor(output):
        output = output.logits if getattr(output, "logits", None) is not None else output[0]
    signs = (torch.randint(0, 2, output.shape, generator=generator) * 2 - 1).to(output.device, output.dtype)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if torch.is_tensor(mask) and output.dim() == 3 and mask.shape == output.shape[:2]:
        signs = signs * mask.to(output.device, output.dtype).unsqueeze(-1)
    return (output * signs).sum()


def weight_importance(model: nn.Module, calibration_data: Iterable, method: str = "hessian",
                      layers: Optional[List[str]] = None, probes: int = 1) -> Dict[str, torch.Tensor]:
    """``{layer name: importance}`` for every Linear/Conv2d layer (or ``layers``), each a non-negative
    tensor of the layer's weight shape (``"hessian"``: the same value down each column)."""
    if method not in METHODS:
        raise ValueError(f"codebook importance method={method!r} is invalid: expected one of {list(METHODS)}.")
    batches = list(calibration_data)
    if not batches:
        raise ValueError("weight importance needs calibration batches (model inputs); got none.")
    chosen = _layers(model, layers)
    if method == "fisher":
        return {n: v.float() for n, v in squared_gradients(model, batches, chosen, probes).items()}
    moments = input_second_moments(model, batches, chosen)
    out = {}
    for name, module in chosen.items():
        weight = module._parameters["weight"]
        out[name] = moments[name].float().expand(weight.shape[0], -1).reshape(weight.shape)
    return out


@torch.no_grad()
def fit_codebooks(model: nn.Module, calibration_data: Iterable, method: str = "hessian", probes: int = 1) -> nn.Module:
    """Refit the tables of every quantized ADQ layer of ``model`` (quantized on load, for instance) to
    its current weights, weighted by their ``method`` importance on ``calibration_data``; records
    ``method`` as the model's ``quantization_config.codebook_weighting``. In place; returns the model."""
    from .quantizers import CodebookWeightQuantizer

    layers = [(n, m) for n, m in quantized_layers(model) if isinstance(m.weight_quantizer, CodebookWeightQuantizer)]
    if not layers:
        raise ValueError("fit_codebooks needs a model with ADQ codebook layers (weight_quantizer='adq').")
    with torch.enable_grad():
        importance = weight_importance(model, calibration_data, method, [n for n, _ in layers], probes)
    for name, layer in layers:
        layer.weight_quantizer.init_from(layer.latent_weight(), importance=importance[name])
    config = getattr(model, "quantization_config", None)
    if config is not None and hasattr(config, "codebook_weighting"):
        config.codebook_weighting = method
    return model
