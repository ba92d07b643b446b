#!/usr/bin/env python
"""Quantization-aware training with knowledge distillation (the ADQ protocol), on Accelerate.

    accelerate launch recipes/qat_imagenet.py --config recipes/configs/fmnist_resnet20_w2a2.yaml
    python recipes/qat_imagenet.py --config ... --set optim.epochs=2 data.batch_size=64 --resume latest

Stages: (1) the full-precision teacher: loaded from ``teacher.checkpoint``, or trained once by this
recipe and cached; (2) the student starts from the teacher's weights, is quantized with the
``quantization`` section (an ``ADQConfig``; mixed precision when ``target_avg_bits`` is set), and
trained with KD + CE; (3) ``adq_hf.save_pretrained`` writes the quantized checkpoint and bit report.
See recipes/README.md for CPU / GPU / multi-node use and what each config reproduces.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys

import yaml

DEFAULTS = {
    "seed": 0,
    "output_dir": "outputs/qat",
    "cache_dir": None,  # teacher cache; default ~/.cache/adq_hf
    "model": {"name": "resnet20_cifar", "checkpoint": None, "pretrained": False, "num_classes": 10, "in_chans": 1,
              "kwargs": {}},
    "teacher": {"name": None, "checkpoint": "auto", "epochs": 2, "lr": 0.1, "max_steps": None},
    "data": {"source": "fashion_mnist", "train_split": "train", "eval_split": "test", "batch_size": 128,
             "eval_batch_size": 256, "num_workers": 0, "augment": "simple", "input_size": None, "mean": None,
             "std": None, "train_limit": None, "eval_limit": None},
    "quantization": {"weight_bits": 4, "activation_bits": 4},
    "calibration": {"num_batches": 4},
    "init": "weights",  # or "ptq": one-shot PTQ (adq_hf.ptq) on the calibration batches before QAT
    "ptq": {"method": "sa"},
    "distill": {"kd_weight": 1.0, "ce_weight": 0.5, "temperature": 2.0},
    "optim": {"optimizer": "sgd", "epochs": 1, "lr": 0.01, "quantizer_lr": 0.001, "weight_decay": 5e-5,
              "momentum": 0.9, "warmup_steps": 50, "grad_accum": 1, "clip_grad": 5.0, "max_steps": None,
              "mixed_precision": "no", "checkpoint_every": 200, "checkpoint_limit": 2, "log_every": 50},
    # compile: torch.compile the training step (true = inductor, or a backend name); the teacher's too
    "train": {"compile": False},
}


class RecipeError(Exception):
    """A user error: printed as one line, exit code 2."""


OPAQUE_SECTIONS = ("quantization", "kwargs")  # their keys are checked by ADQConfig / the model, not here


def merge(base: dict, override: dict, path: str = "", update_opaque: bool = False) -> dict:
    """``override`` on top of ``base``; unknown keys are errors. A config file's ``quantization`` or
    ``kwargs`` section replaces the default one; a ``--set`` (``update_opaque``) changes one key of it."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise RecipeError(f"unknown config key {where!r}; known keys here: {sorted(base)}")
        if isinstance(base[key], dict) and key not in OPAQUE_SECTIONS:
            if not isinstance(value, dict):
                raise RecipeError(f"config key {where!r} must be a mapping")
            out[key] = merge(base[key], value, where + ".", update_opaque)
        elif update_opaque and isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def load_config(path, overrides) -> dict:
    config = copy.deepcopy(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise RecipeError(f"config file {path} does not exist")
        with open(path) as fh:
            config = merge(config, yaml.safe_load(fh) or {})
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.sub=value")
        dotted, raw = item.split("=", 1)
        nested = yaml.safe_load(raw)
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        config = merge(config, nested, update_opaque=True)
    return config


def data_settings(config: dict, model) -> dict:
    from adq_hf.data import resolve_data_config

    data = config["data"]
    return resolve_data_config(model, data["input_size"], data["mean"], data["std"])


def build_loaders(config: dict, resolved: dict, seed: int):
    import torch
    from torch.utils.data import DataLoader

    from adq_hf.data import collate_images, image_transforms, load_image_dataset

    data = config["data"]
    try:
        train_ds = load_image_dataset(data["source"], data["train_split"])
        eval_ds = load_image_dataset(data["source"], data["eval_split"])
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(f"data.source={data['source']!r}: {err}") from None
    if data["train_limit"]:
        train_ds = train_ds.shuffle(seed=seed).select(range(min(int(data["train_limit"]), len(train_ds))))
    if data["eval_limit"]:
        eval_ds = eval_ds.select(range(min(int(data["eval_limit"]), len(eval_ds))))
    try:
        train_tf, eval_tf = image_transforms(resolved, data["augment"])
    except ValueError as err:
        raise RecipeError(f"data.{err}") from None
    train_ds.set_transform(train_tf)
    eval_ds.set_transform(eval_tf)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=data["num_workers"], collate_fn=collate_images)
    train_loader = DataLoader(train_ds, batch_size=data["batch_size"], shuffle=True, drop_last=True,
                              generator=generator, **common)
    eval_loader = DataLoader(eval_ds, batch_size=data["eval_batch_size"], shuffle=False, **common)
    calib_loader = DataLoader(train_ds.with_transform(eval_tf), batch_size=data["batch_size"], shuffle=False, **common)
    return train_loader, eval_loader, calib_loader


def create_float_model(config: dict, name=None):
    import timm

    import adq_hf  # noqa: F401  (registers resnet20_cifar and the quantization hooks)

    spec = config["model"]
    name = name or spec["name"]
    try:
        return timm.create_model(name, pretrained=bool(spec["pretrained"]), num_classes=spec["num_classes"],
                                 in_chans=spec["in_chans"], **spec["kwargs"])
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise RecipeError(f"model.name={name!r} is not a timm model: {err}") from None
        raise


def load_float_weights(model, path: str) -> None:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise RecipeError(f"checkpoint {path} does not exist")
    if not path.endswith(".safetensors"):
        raise RecipeError(f"checkpoint {path}: only .safetensors files are loaded (pickle files can run code)")
    model.load_state_dict(load_file(path))


def teacher_cache_path(config: dict) -> str:
    spec = {k: config[k] for k in ("model", "seed")}
    spec.update(teacher=config["teacher"], data={k: config["data"][k] for k in
                                                 ("source", "train_split", "train_limit", "augment", "batch_size")})
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = config["cache_dir"] or os.path.join(os.path.expanduser("~"), ".cache", "adq_hf")
    name = config["teacher"]["name"] or config["model"]["name"]
    return os.path.join(root, "teachers", f"{name}-{digest}.safetensors")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (recipes/configs/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--init", choices=["weights", "ptq"], help="QAT starting point (overrides init)")
    parser.add_argument("--resume", nargs="?", const="latest", help="'latest' (default) or a checkpoint folder")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        if args.output_dir:
            config["output_dir"] = args.output_dir
        if args.init:
            config["init"] = args.init
        if config["init"] not in ("weights", "ptq"):
            raise RecipeError(f"init={config['init']!r}: choose 'weights' or 'ptq'")
        given = argv if argv is not None else sys.argv[1:]
        return run(config, args.resume, arguments=" ".join(shlex.quote(a) for a in given))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class AdqBackend:
    """The recipe's own quantization: ``adq_hf.quantize_model`` with the ``quantization`` section as
    an ``ADQConfig`` (mixed precision when ``target_avg_bits`` is set), optionally PTQ, and the packed
    ``save_pretrained`` checkpoint with its bit report and model card.

    Peer libraries (B1's brevitas and coremltools rows, ``quantization: {backend: NAME, ...}``) are
    objects with the same methods in ``benchmarks/`` (``PEER_BACKENDS``); adq_hf does not import them.
    """

    name = "adq_hf"
    checkpoints = True  # the student's state dict is tensors only: save_state checkpoints and --resume work

    def __init__(self, config: dict):
        import adq_hf

        self.config = config
        try:
            self.qconfig = adq_hf.ADQConfig(**config["quantization"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"quantization: {err}") from None

    def quantize(self, student, calibration, accelerator, resume):
        """Quantize ``student`` in place; returns a callable to run after every optimiser step, or None."""
        import adq_hf

        adq_hf.quantize_model(student, self.qconfig, calibration_data=calibration)
        if self.config["init"] == "ptq" and resume is None:  # a resumed run restores its own weights
            from adq_hf.ptq import quantize as post_training_quantize

            post_training_quantize(student, calibration, method=self.config["ptq"]["method"], progress=False)
            accelerator.print(f"PTQ ({self.config['ptq']['method']}) initialisation done")
        return None

    def finish(self, student, evaluate):
        """The model to evaluate and save after training, and its metrics (None: the training's last)."""
        return student, None

    def report(self, student) -> dict:
        import adq_hf

        return {"average_weight_bits": adq_hf.average_weight_bits(student), "bit_map": adq_hf.bit_map(student),
                "quantization_config": self.qconfig.to_dict()}

    def save(self, student, final: str, resolved: dict, results: dict) -> None:
        import adq_hf
        from adq_hf.model_card import write_model_card

        adq_hf.save_pretrained(student, final, data_config=resolved)
        adq_hf.write_report(student, None, final)
        write_model_card(final, results=results, recipe_config=yaml.safe_dump(self.config, sort_keys=False),
                         command=results["command"])


# peer libraries of benchmark B1: `quantization: {backend: NAME, ...}` -> benchmarks/<module>.py's Backend
PEER_BACKENDS = {"brevitas": "brevitas_qat", "coreml_dkm": "dkm_qat"}


def quantization_backend(config: dict):
    section = config["quantization"]
    name = section.get("backend") if isinstance(section, dict) else None
    if name is None:
        return AdqBackend(config)
    if name not in PEER_BACKENDS:
        raise RecipeError(f"quantization.backend={name!r} is unknown; peers: {sorted(PEER_BACKENDS)} "
                          "(leave it out for adq_hf)")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import importlib

    return importlib.import_module(PEER_BACKENDS[name]).Backend(config, recipe=sys.modules[__name__])


def run(config: dict, resume=None, arguments: str = "") -> int:
    from accelerate import DataLoaderConfiguration
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from adq_hf.training import TrainSettings, build_accelerator, evaluate_topk, train

    backend = quantization_backend(config)
    if resume and not backend.checkpoints:
        raise RecipeError(f"--resume: the {backend.name} student cannot be checkpointed, so its runs do not resume")
    out = config["output_dir"]
    optim = config["optim"]
    trackers = ["tensorboard"] if _has_tensorboard() else []
    accelerator = build_accelerator(
        gradient_accumulation_steps=optim["grad_accum"],
        mixed_precision=_mixed_precision(optim["mixed_precision"]),
        log_with=trackers or None,
        project_dir=out,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if trackers:
        accelerator.init_trackers("qat", config={"recipe": json.dumps(config)})
    set_seed(config["seed"])
    log_path = os.path.join(out, "metrics.jsonl")
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "recipe_config.yaml"), "w") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)

    def log(record):
        if accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    common = dict(grad_accum=optim["grad_accum"], clip_grad=optim["clip_grad"], max_steps=optim["max_steps"],
                  checkpoint_limit=optim["checkpoint_limit"], log_every=optim["log_every"],
                  optimizer=optim["optimizer"], momentum=optim["momentum"], weight_decay=optim["weight_decay"],
                  compile=config["train"]["compile"])

    # 1. full-precision teacher
    teacher = create_float_model(config, config["teacher"]["name"])
    resolved = data_settings(config, teacher)
    train_loader, eval_loader, calib_loader = build_loaders(config, resolved, config["seed"])
    teacher_path = config["teacher"]["checkpoint"]
    if teacher_path == "auto":
        teacher_path = teacher_cache_path(config)
        if not os.path.isfile(teacher_path):
            accelerator.print(f"training the full-precision teacher ({config['teacher']['epochs']} epochs), "
                              f"cached at {teacher_path}")
            settings = TrainSettings(epochs=config["teacher"]["epochs"], lr=config["teacher"]["lr"],
                                     warmup_steps=optim["warmup_steps"], ce_weight=1.0, kd_weight=0.0,
                                     **{**common, "max_steps": config["teacher"]["max_steps"]})
            teacher, _ = train(accelerator, teacher, train_loader, eval_loader, settings,
                               os.path.join(out, "teacher"), log=log, stage="teacher")
            if accelerator.is_main_process:
                os.makedirs(os.path.dirname(teacher_path), exist_ok=True)
                save_file({k: v.contiguous().cpu() for k, v in teacher.state_dict().items()}, teacher_path + ".tmp")
                os.replace(teacher_path + ".tmp", teacher_path)
            accelerator.wait_for_everyone()
    if teacher_path:
        load_float_weights(teacher, teacher_path)
    teacher = teacher.to(accelerator.device).eval()
    fp_metrics = evaluate_topk(teacher, accelerator.prepare_data_loader(eval_loader), accelerator)
    accelerator.free_memory()
    accelerator.print(f"full-precision teacher: top1 {fp_metrics['top1']:.4f}")

    # 2. quantized student, initialised from the teacher (or its own checkpoint). Reseed: the QAT
    # run must not depend on whether the teacher was just trained (RNG consumed) or loaded.
    set_seed(config["seed"] + 1)
    student = create_float_model(config)
    if config["model"]["checkpoint"]:
        load_float_weights(student, config["model"]["checkpoint"])
    elif teacher_path and (config["teacher"]["name"] in (None, config["model"]["name"])):
        load_float_weights(student, teacher_path)
    calibration = [batch for _, batch in zip(range(config["calibration"]["num_batches"]), calib_loader)]
    on_step = backend.quantize(student, calibration, accelerator, resume)
    settings = TrainSettings(epochs=optim["epochs"], lr=optim["lr"], quantizer_lr=optim["quantizer_lr"],
                             warmup_steps=optim["warmup_steps"], checkpoint_every=optim["checkpoint_every"],
                             checkpoints=backend.checkpoints,
                             kd_weight=config["distill"]["kd_weight"], ce_weight=config["distill"]["ce_weight"],
                             temperature=config["distill"]["temperature"], **common)
    student, metrics = train(accelerator, student, train_loader, eval_loader, settings, out,
                             teacher=teacher, resume=resume, log=log, stage="qat", on_step=on_step)
    student, final_metrics = backend.finish(
        student, lambda model: evaluate_topk(model, accelerator.prepare_data_loader(eval_loader), accelerator))
    if final_metrics is not None:
        metrics = {**metrics, **final_metrics}

    # 3. the quantized checkpoint, its bit report and a results summary
    from accelerate.utils import gather_object

    digests = gather_object([state_digest(student)])  # every rank's weights and quantizer state
    report = backend.report(student)
    avg_bits = report["average_weight_bits"]
    results = {"fp_top1": fp_metrics["top1"], "fp_top5": fp_metrics.get("top5"), "top1": metrics["top1"],
               "top5": metrics.get("top5"), **report,
               "epoch_time_s": [h["epoch_time_s"] for h in metrics["history"]],
               "num_processes": accelerator.num_processes, "rank_state_digests": digests,
               "command": (f"accelerate launch --num_processes {accelerator.num_processes} " if accelerator.num_processes > 1
                           else "python ") + f"recipes/qat_imagenet.py {arguments}".strip()}
    if accelerator.is_main_process:
        final = os.path.join(out, "final")
        backend.save(student, final, resolved, results)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"FP top-1 {100 * fp_metrics['top1']:.2f}% | quantized top-1 {100 * metrics['top1']:.2f}% ({backend.name}) | "
        f"average weight bits {avg_bits:.2f} | checkpoint {os.path.join(out, 'final')}"
    )
    accelerator.end_training()
    return 0


def state_digest(model) -> str:
    """SHA-256 of every tensor in the state dict: equal digests mean identical weights and quantizers."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _mixed_precision(value: str) -> str:
    import torch

    if value == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if value not in ("no", "bf16", "fp16"):
        raise RecipeError(f"optim.mixed_precision={value!r} is invalid: expected 'no', 'bf16', 'fp16' or 'auto'")
    return value


if __name__ == "__main__":
    sys.exit(main())
