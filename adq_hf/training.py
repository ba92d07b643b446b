"""The Accelerate training loop the recipes share: optimiser groups, schedule, distillation,
evaluation, atomic checkpoints and resume. Accelerate does all distribution (DDP/FSDP, CPU/GPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .distill import distillation_loss

QUANTIZER_PARAM_MARKERS = ("weight_quantizer.", "input_quantizer.")


@dataclass
class TrainSettings:
    epochs: float = 1.0
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.05
    quantizer_lr: Optional[float] = None  # None: same as lr
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_steps: int = 0
    grad_accum: int = 1
    clip_grad: Optional[float] = None
    kd_weight: float = 0.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    checkpoint_every: int = 0  # optimiser steps; 0: only at the end of each epoch
    checkpoint_limit: int = 2
    log_every: int = 50
    max_steps: Optional[int] = None  # stop early (tests, smoke runs)


def parameter_groups(model: nn.Module, settings: TrainSettings):
    """Quantizer parameters get their own learning rate and no weight decay; so do biases and norms."""
    decay, no_decay, quant = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(marker in name for marker in QUANTIZER_PARAM_MARKERS):
            quant.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if quant:
        groups.append({"params": quant, "weight_decay": 0.0, "lr": settings.quantizer_lr or settings.lr})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    raise ValueError(f"optimizer={settings.optimizer!r} is invalid: expected 'sgd' or 'adamw'.")


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Progress:
    """Where training is; saved with every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches (not optimiser steps) consumed in the current epoch
    global_step: int = 0  # optimiser steps
    history: list = field(default_factory=list)

    def state_dict(self):
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "history": json.dumps(self.history)}

    def load_state_dict(self, state):
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.history = int(state["global_step"]), json.loads(state["history"])


class CheckpointManager:
    """``save_state`` into a temporary folder, then an atomic rename and a ``latest`` pointer.

    An interrupted save leaves only a ``tmp-*`` folder that resume ignores, so a good checkpoint is
    never replaced by a broken one.
    """

    def __init__(self, accelerator, directory: str, limit: int = 2):
        self.accelerator, self.directory, self.limit = accelerator, directory, max(int(limit), 1)

    def save(self, name: str) -> str:
        acc = self.accelerator
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f"tmp-{name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(self.directory, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = os.path.join(self.directory, "latest")
            with open(pointer + ".tmp", "w") as fh:
                fh.write(name)
            os.replace(pointer + ".tmp", pointer)
            self._prune(keep=name)
        acc.wait_for_everyone()
        return final

    def _prune(self, keep: str) -> None:
        done = [d for d in os.listdir(self.directory) if d.startswith("step-") and d != keep]
        done.sort(key=lambda d: int(d.split("-")[1]))
        for old in done[: max(len(done) - (self.limit - 1), 0)]:
            shutil.rmtree(os.path.join(self.directory, old), ignore_errors=True)

    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.directory, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as fh:
            path = os.path.join(self.directory, fh.read().strip())
        return path if os.path.isdir(path) else None


def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


@torch.no_grad()
def evaluate_topk(model: nn.Module, loader, accelerator) -> Dict[str, float]:
    """Top-1/top-5 over the whole eval set, identical on every rank.

    ``gather_for_metrics`` drops the samples DDP pads with; the main process computes the metric
    (in memory: ranks sharing a disk cache would collide) and broadcasts it.
    """
    from accelerate.utils import broadcast_object_list

    from .metrics import load_topk_accuracy

    metric = load_topk_accuracy(keep_in_memory=True) if accelerator.is_main_process else None
    was_training = model.training
    model.eval()
    for images, labels in loader:
        logits = _logits(model(images))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top, labels = accelerator.gather_for_metrics((top, labels))
        if metric is not None:
            metric.add_batch(predictions=top.cpu().tolist(), references=labels.cpu().tolist())
    model.train(was_training)
    result = [metric.compute() if metric is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    return result[0]


def train(
    accelerator,
    model: nn.Module,
    train_loader,
    eval_loader,
    settings: TrainSettings,
    output_dir: str,
    teacher: Optional[nn.Module] = None,
    resume: Optional[str] = None,
    log: Optional[Callable[[dict], None]] = None,
    stage: str = "train",
) -> Tuple[nn.Module, Dict[str, float]]:
    """Train ``model`` (float or quantized) with optional distillation.

    Returns the trained model (unwrapped) and the last eval metrics plus the per-epoch history.

    ``model``, loaders are unprepared; this prepares them. The teacher is moved to the device and
    frozen, never wrapped in DDP. Checkpoints go to ``output_dir/checkpoints``.
    """
    log = log or (lambda record: None)
    optimizer = build_optimizer(model, settings)
    steps_per_epoch = max(len(train_loader) // max(accelerator.num_processes, 1) // settings.grad_accum, 1)
    total_steps = int(math.ceil(settings.epochs * steps_per_epoch))
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    scheduler = cosine_with_warmup(optimizer, settings.warmup_steps, total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    checkpoints = CheckpointManager(accelerator, os.path.join(output_dir, "checkpoints"), settings.checkpoint_limit)
    if resume:
        path = checkpoints.latest() if resume == "latest" else resume
        if path is None:
            accelerator.print(f"[{stage}] --resume latest: no checkpoint in {checkpoints.directory}, starting fresh")
        else:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"--resume {path}: no such checkpoint folder.")
            accelerator.load_state(path)
            accelerator.print(f"[{stage}] resumed from {path} at epoch {progress.epoch}, step {progress.global_step}")
    metrics: Dict[str, float] = progress.history[-1]["eval"] if progress.history else {}
    num_epochs = int(math.ceil(settings.epochs))
    done = progress.global_step >= total_steps
    while progress.epoch < num_epochs and not done:
        epoch = progress.epoch
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        loader = train_loader
        if progress.step_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
        model.train()
        started = time.perf_counter()
        bar = _progress_bar(accelerator, len(train_loader), progress.step_in_epoch, f"{stage} epoch {epoch}")
        for images, labels in loader:
            with accelerator.accumulate(model):
                logits = _logits(model(images))
                teacher_logits = None
                if teacher is not None and settings.kd_weight:
                    with torch.no_grad():
                        teacher_logits = _logits(teacher(images))
                loss = distillation_loss(
                    logits, labels, teacher_logits, settings.kd_weight, settings.ce_weight, settings.temperature
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), settings.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.step_in_epoch += 1
            bar.update(1)
            if accelerator.sync_gradients:
                progress.global_step += 1
                if progress.global_step % settings.log_every == 0:
                    record = {"stage": stage, "step": progress.global_step, "epoch": epoch,
                              "loss": accelerator.reduce(loss.detach(), "mean").item(),
                              "lr": scheduler.get_last_lr()[0]}
                    accelerator.log({f"{stage}/loss": record["loss"], f"{stage}/lr": record["lr"]},
                                    step=progress.global_step)
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if settings.checkpoint_every and progress.global_step % settings.checkpoint_every == 0:
                    checkpoints.save(f"step-{progress.global_step}")
                if progress.global_step >= total_steps:
                    done = True
                    break
        bar.close()
        epoch_time = time.perf_counter() - started
        metrics = evaluate_topk(model, eval_loader, accelerator)
        progress.history.append({"epoch": epoch, "eval": metrics, "epoch_time_s": epoch_time})
        record = {"stage": stage, "epoch": epoch, "step": progress.global_step, "epoch_time_s": epoch_time, **metrics}
        accelerator.log({f"{stage}/{k}": v for k, v in metrics.items()}, step=progress.global_step)
        log(record)
        accelerator.print(f"[{stage}] epoch {epoch}: top1 {metrics['top1']:.4f} top5 {metrics.get('top5', 0):.4f} "
                          f"({epoch_time:.0f} s)")
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        checkpoints.save(f"step-{progress.global_step}")
    accelerator.wait_for_everyone()
    # Forget this stage's objects so a later stage's checkpoints hold only its own state.
    accelerator._custom_objects.remove(progress)
    trained = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return trained, {**metrics, "history": progress.history}


def _progress_bar(accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=5)
