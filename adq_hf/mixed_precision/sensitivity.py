"""Per-layer sensitivity: the curvature trace of the loss per weight, normalised per parameter.
Gauss-Newton traces from plain backward passes (``"ggn"``, the default, ``gauss_newton.py``), the
Hessian trace by Hutchinson's estimator with double backward (HAWQ-V2/V3; the previous default, 20x
slower on ResNet-20: docs/mixed_precision.md), or the mean squared gradient (Fisher).

The layers are every layer of a type adq_hf quantizes (``adq_hf.nn.WEIGHT_LAYER_TYPES``: Linear,
Conv1d, Conv2d, transformers' Conv1D, Embedding) with a weight, each weight once (a tied weight under
its first layer); for an already quantized layer, its latent float weight: the straight-through
estimator makes the Hessian the one at the quantized weight. The model runs in eval mode during the
analysis (no dropout, BatchNorm running statistics).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import WEIGHT_LAYER_TYPES
from ..surgery import model_inputs
from .gauss_newton import LayerTaps, gauss_newton_traces, rademacher

METHODS = ("ggn", "hutchinson", "fisher")
# Probes per batch and the stopping rule of each estimator (``tol``: relative standard error for
# ggn, relative change of the running mean for hutchinson); docs/mixed_precision.md has the measurements.
PROBE_DEFAULTS = {"ggn": {"max_iters": 20, "min_iters": 2, "tol": 0.1},
                  "hutchinson": {"max_iters": 50, "min_iters": 5, "tol": 1e-2}}


def weight_layers(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{layer name: weight}`` of every quantizable layer (the latent weight of quantized ones), each
    weight once: a weight tied between layers appears under the first of them."""
    layers, seen = {}, set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if isinstance(module, WEIGHT_LAYER_TYPES) and name else None
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            layers[name] = weight
    return layers


def _to_device(value, device):
    return value.to(device) if torch.is_tensor(value) else value


def _logits(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    return output[0]  # transformers ModelOutput / tuple: logits or last_hidden_state first


def _forward(model: nn.Module, batch, pass_labels: bool):
    """Run ``model`` on a batch: ``(output, labels, labels_passed)``. Labels come from ``(inputs,
    labels)`` tuples or a dict's ``labels``/``label``; with ``pass_labels`` they go to a forward that
    takes ``labels`` (transformers heads compute their own loss)."""
    args, kwargs = model_inputs(batch)
    device = next(model.parameters()).device
    args = tuple(_to_device(a, device) for a in args)
    kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
    labels = None
    if isinstance(batch, Mapping) and ("labels" in batch or "label" in batch):
        labels = _to_device(batch["labels"] if "labels" in batch else batch["label"], device)
        if pass_labels and "labels" in inspect.signature(model.forward).parameters:
            kwargs["labels"] = labels
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        labels = _to_device(batch[1], device)
    return model(*args, **kwargs), labels, "labels" in kwargs


def default_loss(model: nn.Module, batch, gauss_newton: bool = False) -> torch.Tensor:
    """The loss the sensitivity is taken of, by batch type:

    - ``(inputs, labels)`` (a tuple/list): cross-entropy of the output (or its ``.logits``) and labels;
    - a dict with ``labels``/``label``: the model's own ``loss`` when its forward takes ``labels``
      (transformers heads), else cross-entropy of the logits;
    - anything else (a tensor, a dict of inputs without labels): the model's ``loss`` if the output
      has one, otherwise a label-free loss of the logits / last hidden state ``y``: with
      ``gauss_newton`` (what Hutchinson uses) ``0.5 * mean((y - y.detach())**2)``, zero in value and
      gradient but with Hessian exactly ``J^T J / N``: the curvature of the output's squared
      distortion, which is what quantizing a weight perturbs; without (Fisher needs a gradient)
      ``0.5 * mean(y**2)``, whose Hessian adds a residual term ``sum y * d2y`` to ``J^T J / N``.
    """
    output, labels, labels_passed = _forward(model, batch, pass_labels=True)
    if labels_passed and getattr(output, "loss", None) is not None:
        return output.loss
    if labels is not None:
        logits = _logits(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    if getattr(output, "loss", None) is not None:
        return output.loss
    y = _logits(output).float()
    return 0.5 * (y - y.detach()).pow(2).mean() if gauss_newton else 0.5 * y.pow(2).mean()


def _wrap_loss(loss_fn) -> Callable[[nn.Module, object], torch.Tensor]:
    """``loss_fn(model, batch) -> scalar``; a torch criterion (``nn.CrossEntropyLoss()``, called as
    ``criterion(output, labels)``) is accepted too, for ``(inputs, labels)`` batches."""
    if loss_fn is None:
        return default_loss
    if isinstance(loss_fn, nn.modules.loss._Loss):
        criterion = loss_fn

        def loss(model, batch):
            if not (isinstance(batch, (tuple, list)) and len(batch) > 1):
                raise ValueError("a torch criterion as loss_fn needs (inputs, labels) batches; "
                                 "pass loss_fn(model, batch) -> scalar for other batches.")
            device = next(model.parameters()).device
            return criterion(_logits(model(batch[0].to(device))), batch[1].to(device))

        return loss
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch) -> scalar tensor, got {loss_fn!r}.")
    return loss_fn


def _batches(dataloader: Iterable, num_batches: int) -> List:
    batches = [b for _, b in zip(range(num_batches), dataloader)]
    if not batches:
        raise ValueError("estimate_sensitivity got no batch: the dataloader is empty.")
    return batches


def estimate_sensitivity(
    model: nn.Module,
    dataloader: Iterable,
    loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
    method: Optional[str] = None,
    num_batches: int = 1,
    max_iters: Optional[int] = None,
    tol: Optional[float] = None,
    seed: int = 0,
    progress: bool = True,
    layers: Optional[List[str]] = None,
    min_iters: Optional[int] = None,
) -> Dict[str, float]:
    """Per-layer sensitivity ``{layer name: value}`` of every quantizable layer's weight (or of
    ``layers``): a trace of the loss curvature with respect to the layer's weight, divided by its
    ``n_i`` parameters, averaged over the first ``num_batches`` batches.

    ``method`` (default ``"ggn"``, or ``"hutchinson"`` when a ``loss_fn`` is given):
    ``"ggn"``: ``Tr(J_i^T H_y J_i) / n_i``, the Gauss-Newton trace, as the mean over output
    probes ``v`` (``E[v v^T] = H_y``, the loss Hessian at the output) of the per-sample squared weight
    gradients of ``<y, v>``: one plain backward per probe (``gauss_newton``). For ReLU networks
    (ResNets) each layer's Hessian block equals its Gauss-Newton block, so this is Hutchinson's
    quantity; for the label-free default loss it is exactly the Hessian Hutchinson uses.
    Per batch the probes stop after ``max_iters`` (default 20) or, after ``min_iters`` (default 2),
    once every layer's relative standard error over the probes is <= ``tol`` (default 0.1).
    Works with ``default_loss`` only (no ``loss_fn``).
    ``"hutchinson"``: ``Tr(H_i) / n_i``, ``H_i`` the Hessian of the loss w.r.t. layer ``i``'s weight,
    estimated as the mean of ``v^T H_i v`` over Rademacher probes ``v`` (Hessian-vector products by
    double backward, all layers per backward pass). Per batch the probes stop after ``max_iters``
    (default 50), or earlier (after at least ``min_iters``, default 5) once the last probe moved the
    layers' running means by less than ``tol`` (default 0.01) relative to their values (the mean over
    layers of ``|new - old| / |old|``).
    ``"fisher"``: ``mean(grad**2)`` per layer, one backward per batch (the empirical Fisher diagonal).

    ``loss_fn(model, batch) -> scalar`` (default: ``default_loss``: cross-entropy for
    ``(inputs, labels)``; see its docstring for dicts and label-free batches); a torch criterion such
    as ``nn.CrossEntropyLoss()`` also works. Probes come from a CPU generator seeded with ``seed``,
    so the result does not depend on the device or global RNG state. The model runs in eval mode and
    is put back in its mode afterwards; ``requires_grad`` flags are restored.
    """
    if method is None:
        method = "ggn" if loss_fn is None else "hutchinson"
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {list(METHODS)}.")
    defaults = PROBE_DEFAULTS.get(method, PROBE_DEFAULTS["hutchinson"])
    max_iters = defaults["max_iters"] if max_iters is None else max_iters
    min_iters = defaults["min_iters"] if min_iters is None else min_iters
    tol = defaults["tol"] if tol is None else tol
    for name, value, low in (("num_batches", num_batches, 1), ("max_iters", max_iters, 1), ("min_iters", min_iters, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol={tol!r} is invalid: expected a number >= 0.")
    if method == "ggn" and loss_fn is not None:
        raise ValueError("method='ggn' takes the curvature of default_loss from the model output (cross-entropy on "
                         "logits, or the label-free Gauss-Newton loss); a custom loss_fn needs method='hutchinson' "
                         "(or 'fisher').")
    loss_fn = functools.partial(default_loss, gauss_newton=method == "hutchinson") if loss_fn is None else _wrap_loss(loss_fn)
    all_layers = weight_layers(model)
    if not all_layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layer (Linear, Conv1d, Conv2d, Conv1D, Embedding) to analyse.")
    if layers is not None:
        unknown = sorted(set(layers) - set(all_layers))
        if unknown:
            raise ValueError(f"layers {unknown[:5]} are not quantizable layers of the model "
                             f"(names look like {list(all_layers)[:3]}).")
        all_layers = {n: all_layers[n] for n in layers}
    names, params = list(all_layers), list(all_layers.values())
    batches = _batches(dataloader, num_batches)
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    totals = torch.zeros(len(params), dtype=torch.float64)
    bar = _bar(progress, len(batches) * (1 if method == "fisher" else max_iters), f"sensitivity ({method})")
    try:
        for batch in batches:
            if method == "ggn":
                totals += _gauss_newton(model, batch, names, params, generator, max_iters, min_iters, tol, bar)
                continue
            with _twice_differentiable_attention():
                loss = loss_fn(model, batch)
            if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError("loss_fn must return a scalar tensor that depends on the layer weights.")
            if method == "fisher":
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                totals += torch.tensor([_sq(g) for g in grads], dtype=torch.float64)
                bar.update(1)
                continue
            totals += _hutchinson(loss, params, generator, max_iters, min_iters, tol, bar)
    finally:
        bar.close()
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        model.train(was_training)
    counts = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    values = totals / len(batches) / counts
    return {n: float(v) for n, v in zip(names, values)}


def _twice_differentiable_attention():
    """Hessian-vector products need double backward; fused CPU/GPU attention kernels lack it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _sq(g: Optional[torch.Tensor]) -> float:
    return 0.0 if g is None else float(g.detach().double().pow(2).sum())


def _gauss_newton(model, batch, names, params, generator, max_iters, min_iters, tol, bar, exact=False) -> torch.Tensor:
    """One batch of ``method="ggn"`` (``gauss_newton.gauss_newton_traces``)."""
    modules = dict(model.named_modules())
    layer_modules = [modules[n] for n in names]
    with LayerTaps(dict(enumerate(layer_modules))) as taps:
        output, labels, _ = _forward(model, batch, pass_labels=False)
    y = _logits(output)
    if not (torch.is_tensor(y) and y.requires_grad):
        raise ValueError("method='ggn' needs a model output (a tensor, .logits or the first output) that depends on "
                         "the layer weights.")
    return gauss_newton_traces(y, labels, layer_modules, params, taps, generator, max_iters, min_iters, tol, bar,
                               exact=exact)


def _hutchinson(loss, params, generator, max_iters, min_iters, tol, bar) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: zero Hessian
    sums = torch.zeros(len(params), dtype=torch.float64)
    previous: Optional[torch.Tensor] = None
    done = 0
    for it in range(1, max_iters + 1):
        probes = [rademacher(p, generator) for p in params]  # drawn for every layer: same stream always
        if live:
            hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                     grad_outputs=[probes[i] for i in live], retain_graph=True, allow_unused=True)
            quads = [(h.float() * probes[i].float()).sum() if h is not None
                     else probes[i].new_zeros((), dtype=torch.float32) for i, h in zip(live, hv)]
            if len({q.device for q in quads}) == 1:
                sums[live] += torch.stack(quads).double().cpu()  # one device sync per probe
            else:
                sums[live] += torch.tensor([float(q) for q in quads], dtype=torch.float64)
        bar.update(1)
        done = it
        mean = sums / it
        if previous is not None and it >= min_iters:
            change = ((mean - previous).abs() / previous.abs().clamp(min=1e-30)).mean()
            if change < tol:
                break
        previous = mean
    bar.update(max_iters - done)
    return sums / done


def _bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def exact_layer_traces(model: nn.Module, batch, loss_fn=None) -> Tuple[Dict[str, float], Dict[str, int]]:
    """Exact ``Tr(H_i)`` from each layer's full Hessian (``torch.autograd.functional.hessian``):
    tiny models only (tests, validation). Returns ``(traces, numels)``."""
    from torch.func import functional_call

    loss_fn = _wrap_loss(loss_fn)
    traces, sizes = {}, {}
    was_training = model.training
    model.eval()
    try:
        for name, param in weight_layers(model).items():
            key = name + ".weight"

            def loss_of(weight, key=key):
                class _Call(nn.Module):  # the model with this one weight replaced
                    def forward(self_, *args, **kwargs):
                        return functional_call(model, {key: weight}, args, kwargs)

                    def parameters(self_, recurse=True):
                        return model.parameters(recurse)

                return loss_fn(_Call(), batch)

            hessian = torch.autograd.functional.hessian(loss_of, param.detach().clone())
            traces[name] = float(hessian.reshape(param.numel(), param.numel()).diagonal().sum())
            sizes[name] = param.numel()
    finally:
        model.train(was_training)
    return traces, sizes


def exact_gauss_newton_traces(model: nn.Module, batch, layers: Optional[List[str]] = None) -> Dict[str, float]:
    """Exact per-layer ``Tr(J_i^T H_y J_i) / n_i`` of a classification batch ``(inputs, labels)`` (or a
    dict with labels): per-sample squared gradients of each column of the cross-entropy root, one
    backward per class. For ReLU networks this is the exact per-layer Hessian trace too (validation:
    the reference the B4 benchmark compares both estimators with)."""
    all_layers = weight_layers(model)
    names = list(all_layers) if layers is None else list(layers)
    params = [all_layers[n] for n in names]
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        totals = _gauss_newton(model, batch, names, params, None, 1, 1, 0.0, _bar(False, 1, ""), exact=True)
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        model.train(was_training)
    return {n: float(t) / p.numel() for n, t, p in zip(names, totals, params)}
