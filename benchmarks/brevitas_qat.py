"""The recipe's QAT run with a brevitas student (B1's peer-library row), same budget as our rows.

Reached through ``recipes/qat_imagenet.py`` when the config says ``quantization: {backend:
brevitas, weight_bits: W, activation_bits: A}`` (recipes/configs/fmnist_resnet20_brevitas_*.yaml):

    python recipes/qat_imagenet.py --config recipes/configs/fmnist_resnet20_brevitas_w2a2.yaml \
        --output-dir outputs/benchmarks/standard/brevitas_w2a2 --set teacher.epochs=2 optim.warmup_steps=30

Everything except building the quantized student is the recipe's own code, called from the
recipe module: config, data (``build_loaders``), the FP teacher (``teacher_cache_path``: the same
cached file as every other row; trained with the recipe's settings when missing), the student's
start from the teacher's weights, the calibration batches, ``adq_hf.training.train`` (optimiser,
schedule, distillation, clipping, checkpoints, resume) and ``evaluate_topk``. The student is
converted by ``brevitas_peer.convert`` and its activation scales initialised by
``brevitas_peer.calibrate`` on ``calibration.num_batches`` batches, where our rows call
``adq_hf.quantize_model``.

Outputs: ``results.json`` with the recipe's keys (``fp_top1``, ``fp_top5``, ``top1``, ``top5``,
``average_weight_bits``, ``epoch_time_s``, ``num_processes``, ``rank_state_digests``, ``bit_map``,
``quantization_config`` (with ``activation_bits``), ``command``), ``metrics.jsonl``,
``recipe_config.yaml``, and ``final/``: the brevitas model's state dict (``model.safetensors``,
fake-quant weights in float and the learned activation scales; our packed b-bit format does not
apply) and ``brevitas_config.json``. ``load_final`` rebuilds the model from them.
"""

from __future__ import annotations

import json
import os
import sys

BREVITAS_KEYS = {"backend", "weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits", "layer_bits"}


def quantization_settings(config: dict, recipe) -> dict:
    """The ``quantization`` section, checked; errors are the recipe's one-line ``RecipeError``."""
    q = dict(config["quantization"])
    unknown = sorted(set(q) - BREVITAS_KEYS)
    if unknown:
        raise recipe.RecipeError(f"quantization: backend brevitas does not take {unknown}; "
                                 f"known fields: {sorted(BREVITAS_KEYS)}")
    if config["init"] != "weights":
        raise recipe.RecipeError(f"init={config['init']!r}: backend brevitas starts from the weights only")
    settings = {"weight_bits": q.get("weight_bits", 4), "activation_bits": q.get("activation_bits", 4),
                "first_layer_bits": q.get("first_layer_bits", 8), "last_layer_bits": q.get("last_layer_bits", 8),
                "layer_bits": q.get("layer_bits") or {}}
    from adq_hf import ADQConfig

    try:  # the same bit checks as our rows (2-8 bits; activation_bits None = weight-only)
        ADQConfig(**settings)
    except (TypeError, ValueError) as err:
        raise recipe.RecipeError(f"quantization: {err}") from None
    return settings


def _peer(recipe):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import brevitas_peer
    except ImportError as err:
        if recipe is None:
            raise
        raise recipe.RecipeError(f"quantization.backend=brevitas: {err}") from None
    return brevitas_peer


def run(config: dict, resume, arguments: str, recipe) -> int:
    """``recipe.run`` with a brevitas student; ``recipe`` is the recipes/qat_imagenet.py module."""
    settings_q = quantization_settings(config, recipe)
    peer = _peer(recipe)

    import yaml
    from accelerate import DataLoaderConfiguration
    from accelerate.utils import gather_object, set_seed
    from safetensors.torch import save_file

    from adq_hf.training import TrainSettings, build_accelerator, evaluate_topk, train

    out = config["output_dir"]
    optim = config["optim"]
    trackers = ["tensorboard"] if recipe._has_tensorboard() else []
    accelerator = build_accelerator(
        gradient_accumulation_steps=optim["grad_accum"],
        mixed_precision=recipe._mixed_precision(optim["mixed_precision"]),
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

    # 1. the full-precision teacher: the recipe's cached file (trained as the recipe trains it if missing)
    teacher = recipe.create_float_model(config, config["teacher"]["name"])
    resolved = recipe.data_settings(config, teacher)
    train_loader, eval_loader, calib_loader = recipe.build_loaders(config, resolved, config["seed"])
    teacher_path = config["teacher"]["checkpoint"]
    if teacher_path == "auto":
        teacher_path = recipe.teacher_cache_path(config)
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
        recipe.load_float_weights(teacher, teacher_path)
    teacher = teacher.to(accelerator.device).eval()
    fp_metrics = evaluate_topk(teacher, accelerator.prepare_data_loader(eval_loader), accelerator)
    accelerator.free_memory()
    accelerator.print(f"full-precision teacher: top1 {fp_metrics['top1']:.4f}")

    # 2. the brevitas student from the teacher's weights, activation scales from the calibration batches
    set_seed(config["seed"] + 1)
    student = recipe.create_float_model(config)
    if config["model"]["checkpoint"]:
        recipe.load_float_weights(student, config["model"]["checkpoint"])
    elif teacher_path and (config["teacher"]["name"] in (None, config["model"]["name"])):
        recipe.load_float_weights(student, teacher_path)
    calibration = [batch for _, batch in zip(range(config["calibration"]["num_batches"]), calib_loader)]
    try:
        peer.convert(student, calibration_batches=calibration, **settings_q)
    except ValueError as err:
        raise recipe.RecipeError(f"quantization: {err}") from None
    if settings_q["activation_bits"] is not None:
        peer.calibrate(student, calibration)
    settings = TrainSettings(epochs=optim["epochs"], lr=optim["lr"], quantizer_lr=optim["quantizer_lr"],
                             warmup_steps=optim["warmup_steps"], checkpoint_every=optim["checkpoint_every"],
                             kd_weight=config["distill"]["kd_weight"], ce_weight=config["distill"]["ce_weight"],
                             temperature=config["distill"]["temperature"], **common)
    student, metrics = train(accelerator, student, train_loader, eval_loader, settings, out,
                             teacher=teacher, resume=resume, log=log, stage="qat")

    # 3. results (the recipe's keys) and the brevitas state dict
    digests = gather_object([recipe.state_digest(student)])
    avg_bits = peer.average_weight_bits(student)
    qconfig = dict(student.brevitas_config)
    results = {"fp_top1": fp_metrics["top1"], "fp_top5": fp_metrics.get("top5"), "top1": metrics["top1"],
               "top5": metrics.get("top5"), "average_weight_bits": avg_bits,
               "epoch_time_s": [h["epoch_time_s"] for h in metrics["history"]],
               "num_processes": accelerator.num_processes, "rank_state_digests": digests,
               "bit_map": peer.bit_map(student), "quantization_config": qconfig,
               "command": (f"accelerate launch --num_processes {accelerator.num_processes} "
                           if accelerator.num_processes > 1 else "python ")
               + f"recipes/qat_imagenet.py {arguments}".strip()}
    if accelerator.is_main_process:
        final = os.path.join(out, "final")
        os.makedirs(final, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
                  os.path.join(final, "model.safetensors"))
        with open(os.path.join(final, "brevitas_config.json"), "w") as fh:
            json.dump({**qconfig, "model": config["model"], "data_config": resolved}, fh, indent=2, default=str)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"FP top-1 {100 * fp_metrics['top1']:.2f}% | quantized top-1 {100 * metrics['top1']:.2f}% (brevitas "
        f"{qconfig['brevitas_version']}) | average weight bits {avg_bits:.2f} | state dict {os.path.join(out, 'final')}"
    )
    accelerator.end_training()
    return 0


def load_final(folder: str):
    """The trained brevitas model from ``final/`` (``model.safetensors`` + ``brevitas_config.json``)."""
    import timm
    from safetensors.torch import load_file

    import adq_hf  # noqa: F401  (registers resnet20_cifar)

    peer = _peer(None)
    with open(os.path.join(folder, "brevitas_config.json")) as fh:
        cfg = json.load(fh)
    spec = cfg["model"]
    model = timm.create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                              **(spec.get("kwargs") or {}))
    peer.convert(model, cfg["weight_bits"], cfg["activation_bits"], cfg["first_layer_bits"], cfg["last_layer_bits"],
                 signed=cfg["signed_inputs"], layer_bits=cfg.get("layer_bits"))
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval()
