"""The Accelerate training loop the recipes share: optimiser groups, schedule, distillation,
evaluation, atomic checkpoints and resume. Accelerate does all distribution (DDP/FSDP, CPU/GPU).

FSDP (``accelerate launch --config_file recipes/configs/accelerate_fsdp.yaml``; docs/methods.md,
"FSDP") is FSDP2 ``fully_shard``: the layers' weights are sharded; the quantizers' own parameters
(scalars and tiny vectors, which ``fully_shard`` cannot or need not shard) stay whole on every rank,
their gradients averaged here; each forward sees the all-gathered weight, so codebook updates read
the full weight on every rank. Accelerate enables FSDP only on accelerators: ``build_accelerator``
also enables it for CPU processes (gloo), which is what the tests run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .distill import distillation_loss

QUANTIZER_MODULE_NAMES = ("weight_quantizer", "input_quantizer")  # adq_hf.nn's quantized layers name them so
QUANTIZER_PARAM_MARKERS = tuple(f"{name}." for name in QUANTIZER_MODULE_NAMES)


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
    checkpoints: bool = True  # False: none at all (a model whose state is not tensors only cannot be saved)
    checkpoint_limit: int = 2
    log_every: int = 50
    max_steps: Optional[int] = None  # stop early (tests, smoke runs)
    # torch.compile the training forward/backward: False, True (inductor) or a backend name
    compile: Union[bool, str] = False


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


def build_accelerator(**kwargs):
    """``Accelerator(**kwargs)``, with FSDP for CPU processes too when the launch asked for it.

    Accelerate ignores ``distributed_type: FSDP`` on CPU processes and silently runs DDP; with
    ``ACCELERATE_USE_FSDP=true`` (what ``accelerate launch`` sets for an FSDP config) this switches
    the state to FSDP2 with the plugin built from the ``FSDP_*`` variables, as on GPUs.
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(**kwargs)
    if (accelerator.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise ValueError(f"fsdp_version={plugin.fsdp_version}: FSDP on CPU processes needs fsdp_version: 2 "
                             "(recipes/configs/accelerate_fsdp.yaml).")
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


class ShardedTraining:
    """What FSDP2 needs beyond Accelerate's ``prepare``: the quantizer modules left out of sharding
    and their gradients averaged across ranks, rank 0's BatchNorm statistics before evaluation (DDP
    broadcasts them at every forward), and the trained model as a plain module. Inactive (every
    method a no-op) without FSDP."""

    def __init__(self, accelerator, model: nn.Module):
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.active = accelerator.distributed_type == DistributedType.FSDP
        self.modules = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in QUANTIZER_MODULE_NAMES]
        self.params, self.template = [], None
        if not self.active:
            return
        plugin = accelerator.state.fsdp_plugin
        if self.modules and plugin.fsdp_version != 2:
            raise ValueError(f"fsdp_version={plugin.fsdp_version} with a quantized model: use fsdp_version: 2 "
                             "(recipes/configs/accelerate_fsdp.yaml); FSDP1 is not supported.")
        if self.modules:
            ignored = plugin.ignored_modules
            if isinstance(ignored, str):
                raise ValueError(f"fsdp_ignored_modules={ignored!r}: adq_hf sets the ignored modules itself (the "
                                 "quantizers); leave it unset.")
            plugin.ignored_modules = list(ignored or []) + self.modules
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.template = copy.deepcopy(model)  # receives the full state dict at the end

    def average_gradients(self) -> None:
        """All-reduce (mean) the replicated parameters' gradients; FSDP averages the sharded ones."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def broadcast_other_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics (and any other non-quantizer buffer) to every rank; quantizer
        buffers (codebooks) are left as each rank has them."""
        if not self.active or self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        own = {id(b) for m in self.modules for b in m.buffers()}
        for buffer in model.buffers():
            if id(buffer) not in own:
                dist.broadcast(buffer, src=0)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain module: under FSDP the full state dict (on every rank) loaded
        into an unsharded copy; otherwise Accelerate's unwrapping."""
        if not self.active:
            return self.accelerator.unwrap_model(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        self.template.load_state_dict(full)
        return self.template


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
    on_step: Optional[Callable[[], None]] = None,
) -> Tuple[nn.Module, Dict[str, float]]:
    """Train ``model`` (float or quantized) with optional distillation.

    Returns the trained model (unwrapped) and the last eval metrics plus the per-epoch history.

    ``model``, loaders are unprepared; this prepares them. The teacher is moved to the device and
    frozen, never wrapped in DDP. Checkpoints go to ``output_dir/checkpoints``. ``on_step`` runs after
    every optimiser step (e.g. a peer library's schedule: coremltools' ``palettizer.step()``).
    """
    log = log or (lambda record: None)
    optimizer = build_optimizer(model, settings)
    steps_per_epoch = max(len(train_loader) // max(accelerator.num_processes, 1) // settings.grad_accum, 1)
    total_steps = int(math.ceil(settings.epochs * steps_per_epoch))
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    scheduler = cosine_with_warmup(optimizer, settings.warmup_steps, total_steps)
    sharded = ShardedTraining(accelerator, model)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    step_model = compiled(model, settings.compile)  # evaluation runs the uncompiled model (no second compile)
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
                logits = _logits(step_model(images))
                teacher_logits = None
                if teacher is not None and settings.kd_weight:
                    with torch.no_grad():
                        teacher_logits = _logits(teacher(images))
                loss = distillation_loss(
                    logits, labels, teacher_logits, settings.kd_weight, settings.ce_weight, settings.temperature
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    sharded.average_gradients()
                if accelerator.sync_gradients and settings.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), settings.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.step_in_epoch += 1
            bar.update(1)
            if accelerator.sync_gradients:
                progress.global_step += 1
                if on_step is not None:
                    on_step()
                if progress.global_step % settings.log_every == 0:
                    record = {"stage": stage, "step": progress.global_step, "epoch": epoch,
                              "loss": accelerator.reduce(loss.detach(), "mean").item(),
                              "lr": scheduler.get_last_lr()[0]}
                    accelerator.log({f"{stage}/loss": record["loss"], f"{stage}/lr": record["lr"]},
                                    step=progress.global_step)
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if (settings.checkpoints and settings.checkpoint_every
                        and progress.global_step % settings.checkpoint_every == 0):
                    checkpoints.save(f"step-{progress.global_step}")
                if progress.global_step >= total_steps:
                    done = True
                    break
        bar.close()
        epoch_time = time.perf_counter() - started
        sharded.broadcast_other_buffers(model)
        metrics = evaluate_topk(model, eval_loader, accelerator)
        progress.history.append({"epoch": epoch, "eval": metrics, "epoch_time_s": epoch_time})
        record = {"stage": stage, "epoch": epoch, "step": progress.global_step, "epoch_time_s": epoch_time, **metrics}
        accelerator.log({f"{stage}/{k}": v for k, v in metrics.items()}, step=progress.global_step)
        log(record)
        accelerator.print(f"[{stage}] epoch {epoch}: top1 {metrics['top1']:.4f} top5 {metrics.get('top5', 0):.4f} "
                          f"({epoch_time:.0f} s)")
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        if settings.checkpoints:
            checkpoints.save(f"step-{progress.global_step}")
    accelerator.wait_for_everyone()
    # Forget this stage's objects so a later stage's checkpoints hold only its own state.
    accelerator._custom_objects.remove(progress)
    trained = sharded.unwrap(model)
    accelerator.free_memory()
    return trained, {**metrics, "history": progress.history}


def compiled(model: nn.Module, setting: Union[bool, str]) -> nn.Module:
    """``torch.compile(model)`` for ``setting`` True (inductor) or a backend name; the model itself for
    False. Compiled after Accelerate's wrapping (DDP/FSDP), as Accelerate does; the wrapper shares the
    parameters, so checkpoints, evaluation and the returned model use the uncompiled module."""
    if setting in (False, None, "", "false", "no"):
        return model
    backend = "inductor" if setting in (True, "true", "inductor") else str(setting)
    return torch.compile(model, backend=backend)


def _progress_bar(accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=5)
