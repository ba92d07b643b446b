"""Per-layer sensitivity: the Hessian trace of the loss per weight (Hutchinson, as HAWQ-V2/V3),
or the mean squared gradient (Fisher) as the cheap alternative. Both normalised per parameter."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..surgery import model_inputs

METHODS = ("hutchinson", "fisher")


def weight_layers(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{layer name: weight}`` of every Linear/Conv2d (the latent weight of quantized ones)."""
    return {
        name: module._parameters["weight"]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name and module._parameters.get("weight") is not None
    }


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy for ``(inputs, labels)`` batches; the model's own ``loss`` for dict batches
    with labels; otherwise ``0.5 * mean(output**2)`` of the logits / last hidden state (a label-free
    proxy for encoders: its Hessian is the output Jacobian's Gram matrix, as in a Gauss-Newton)."""
    args, kwargs = model_inputs(batch)
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    if isinstance(batch, dict) and ("labels" in batch or "label" in batch):
        kwargs["labels"] = (batch.get("labels") if "labels" in batch else batch["label"]).to(device)
        return model(*args, **kwargs).loss
    output = model(*args, **kwargs)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        logits = output if torch.is_tensor(output) else output.logits
        return F.cross_entropy(logits, batch[1].to(device))
    if not torch.is_tensor(output):
        output = getattr(output, "logits", None) if getattr(output, "logits", None) is not None else output[0]
    return 0.5 * output.float().pow(2).mean()


def _batches(dataloader: Iterable, num_batches: int) -> List:
    batches = [b for _, b in zip(range(num_batches), dataloader)]
    if not batches:
        raise ValueError("estimate_sensitivity got no batch: the dataloader is empty.")
    return batches


def estimate_sensitivity(
    model: nn.Module,
    dataloader: Iterable,
    loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None,
    method: str = "hutchinson",
    num_batches: int = 1,
    max_iters: int = 50,
    tol: float = 1e-2,
    min_iters: int = 5,
    seed: int = 0,
    layers: Optional[List[str]] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Per-layer sensitivity ``{layer name: value}``.

    ``"hutchinson"``: ``Tr(H_i) / n_i`` with ``H_i`` the Hessian of the loss w.r.t. layer ``i``'s
    weight (``n_i`` parameters), estimated as ``E[v^T H v]`` over Rademacher probes ``v`` (Hessian-
    vector products by double backward), averaged over ``num_batches`` batches; per batch, probes stop
    after ``max_iters`` or when the layers' running means moved by less than ``tol`` (relative, the
    mean over layers) in the last probe (after ``min_iters``). ``"fisher"``: ``mean(grad**2)`` per layer. Deterministic
    for a given ``seed``. The model runs in eval mode (no dropout, fixed BatchNorm statistics).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {list(METHODS)}.")
    if max_iters < 1 or num_batches < 1:
        raise ValueError("max_iters and num_batches must be >= 1.")
    loss_fn = loss_fn or default_loss
    all_layers = weight_layers(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(all_layers))
        if unknown:
            raise ValueError(f"layers {unknown[:5]} are not Linear/Conv2d layers of the model.")
        all_layers = {n: all_layers[n] for n in layers}
    names, params = list(all_layers), list(all_layers.values())
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    totals = torch.zeros(len(params), dtype=torch.float64)
    batches = _batches(dataloader, num_batches)
    bar = _bar(progress, len(batches) * (1 if method == "fisher" else max_iters), f"sensitivity ({method})")
    try:
        for batch in batches:
            with _twice_differentiable_attention():
                loss = loss_fn(model, batch)
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


def _hutchinson(loss, params, generator, max_iters, min_iters, tol, bar) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    usable = [g is not None and g.requires_grad for g in grads]
    sums = torch.zeros(len(params), dtype=torch.float64)
    previous: Optional[torch.Tensor] = None
    done = 0
    for it in range(1, max_iters + 1):
        probes = [
            (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(p.device, p.dtype)
            for p in params
        ]
        live = [i for i, ok in enumerate(usable) if ok]
        hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                 grad_outputs=[probes[i] for i in live], retain_graph=True, allow_unused=True)
        for i, h in zip(live, hv):
            if h is not None:
                sums[i] += float((h.double() * probes[i].double()).sum())
        bar.update(1)
        done = it
        mean = sums / it
        if previous is not None and it >= min_iters:
            change = ((mean - previous).abs() / previous.abs().clamp(min=1e-12)).mean()
            if change < tol:
                break
        previous = mean
    bar.update(max_iters - done)
    return sums / done


def _bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def exact_layer_traces(model: nn.Module, batch, loss_fn=None) -> Tuple[Dict[str, float], Dict[str, int]]:
    """Exact ``Tr(H_i)`` by forming each layer's full Hessian (tiny models only: tests, validation)."""
    loss_fn = loss_fn or default_loss
    traces, sizes = {}, {}
    model.eval()
    for name, param in weight_layers(model).items():
        grad = torch.autograd.grad(loss_fn(model, batch), param, create_graph=True)[0].reshape(-1)
        trace = sum(float(torch.autograd.grad(grad[k], param, retain_graph=True)[0].reshape(-1)[k])
                    for k in range(grad.numel()))
        traces[name], sizes[name] = trace, param.numel()
    return traces, sizes
