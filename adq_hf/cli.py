"""``adq-hf``: command-line entry points.

    adq-hf sensitivity resnet20_cifar --in-chans 1 --num-classes 10 --checkpoint teacher.safetensors \\
        --dataset fashion_mnist --input-size 1 28 28 --target-avg-bits 2.8 --out report/
    adq-hf ptq resnet20_cifar --in-chans 1 --num-classes 10 --checkpoint teacher.safetensors \\
        --input-size 1 28 28 --bits 3 --method sa --out resnet20-ptq-w3
    adq-hf card outputs/fmnist_resnet20_w2a2          # README.md model card from a recipe run
    adq-hf push outputs/fmnist_resnet20_w2a2/final org/resnet20-fmnist-w2a2 [--private] [--revision B]
    adq-hf download org/resnet20-fmnist-w2a2 [--revision SHA] [--local-dir DIR]
    adq-hf export outputs/fmnist_resnet20_w2a2/final model.onnx [--input-size 1 28 28]   # needs adq_hf[deploy]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _calibration_batches(args, model):
    """``args.num_batches`` batches of ``(images, labels)``: from a dataset, or random (``--dataset random``)."""
    import torch

    from .data import resolve_data_config

    resolved = resolve_data_config(model, args.input_size)
    if args.dataset == "random":  # smoke use: Gaussian images, uniform labels, fixed seed
        generator = torch.Generator().manual_seed(args.seed)
        classes = model.get_classifier().out_features if hasattr(model, "get_classifier") and hasattr(
            model.get_classifier(), "out_features") else (args.num_classes or 10)
        return [(torch.randn(args.batch_size, *resolved["input_size"], generator=generator),
                 torch.randint(0, classes, (args.batch_size,), generator=generator)) for _ in range(args.num_batches)]
    from torch.utils.data import DataLoader

    from .data import collate_images, image_transforms, load_image_dataset

    dataset = load_image_dataset(args.dataset, args.split).shuffle(seed=args.seed)
    dataset = dataset.select(range(min(len(dataset), args.batch_size * args.num_batches)))
    dataset.set_transform(image_transforms(resolved, "none")[1])
    return list(DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_images))


def _sensitivity(args) -> int:
    from . import ADQConfig
    from .mixed_precision import allocate_bits, estimate_sensitivity, write_report
    from .mixed_precision.allocation import average_bits
    from .mixed_precision.sensitivity import weight_layers
    from .surgery import plan_quantization

    model = _float_model(args)
    batches = _calibration_batches(args, model)
    config = ADQConfig(weight_bits=args.weight_bits, weight_quantizer=args.weight_quantizer,
                       granularity=args.granularity)
    plans = plan_quantization(model, config)
    body = [p.name for p in plans if p.role == "body"]
    fixed = {p.name: p.weight_bits for p in plans if p.role != "body"}
    sensitivity = estimate_sensitivity(model, batches, method=args.method, num_batches=len(batches),
                                       max_iters=args.max_iters, seed=args.seed, layers=body,
                                       progress=not args.no_progress)
    if args.target_avg_bits is not None or args.max_bytes is not None:
        bits = allocate_bits(model, sensitivity, target_avg_bits=args.target_avg_bits, max_bytes=args.max_bytes,
                             candidates=args.candidates, config=config, fixed=fixed)
    else:
        bits = {name: config.weight_bits for name in body}
    params = {n: w.numel() for n, w in weight_layers(model).items()}
    paths = write_report({**fixed, **bits}, sensitivity, args.out, model=model)
    print(open(paths["md"]).read())
    print(f"average weight bits {average_bits({**fixed, **bits}, params):.4f}; "
          f"layer_bits for ADQConfig (also in {paths['json']}):")
    print(json.dumps(bits))
    with open(paths["json"]) as fh:
        report = json.load(fh)
    report["layer_bits"] = bits
    report["command"] = {k: v for k, v in vars(args).items() if k != "handler"}
    with open(paths["json"], "w") as fh:
        json.dump(report, fh, indent=2)
    return 0


def _model_and_data_arguments(parser, num_batches: int) -> None:
    parser.add_argument("model", help="timm model name")
    parser.add_argument("--checkpoint", help="float weights (.safetensors state dict)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="fashion_mnist, an image folder, a Hub id, or 'random' (Gaussian images, for smoke tests)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-batches", type=int, default=num_batches)


def _float_model(args):
    import timm

    kwargs = {"in_chans": args.in_chans}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = timm.create_model(args.model, **kwargs)
    if args.checkpoint:
        from safetensors.torch import load_file

        if not args.checkpoint.endswith(".safetensors"):
            raise ValueError(f"--checkpoint {args.checkpoint}: only .safetensors state dicts are loaded.")
        model.load_state_dict(load_file(args.checkpoint))
    return model


def _ptq(args) -> int:
    from . import ADQConfig, average_weight_bits, save_pretrained, write_report
    from .data import resolve_data_config
    from .ptq import quantize

    model = _float_model(args).eval()
    batches = _calibration_batches(args, model)
    config = ADQConfig(weight_bits=args.bits, activation_bits=args.activation_bits,
                       weight_quantizer=args.weight_quantizer, granularity=args.granularity)
    quantize(model, batches, config, method=args.method, progress=not args.no_progress)
    save_pretrained(model, args.out, data_config=resolve_data_config(model, args.input_size))
    write_report(model, None, args.out)
    errors = model.ptq_report
    print(f"PTQ ({args.method}) of {len(errors)} layers: reconstruction error {sum(r['error'] for r in errors.values()):.4g} "
          f"(round-to-nearest {sum(r['rtn_error'] for r in errors.values()):.4g}); average weight bits "
          f"{average_weight_bits(model):.3f}; saved to {args.out}")
    return 0


def _card(args) -> int:
    from .model_card import write_model_card

    run_dir = args.run_dir.rstrip("/")
    folder = os.path.join(run_dir, "final") if os.path.isdir(os.path.join(run_dir, "final")) else run_dir
    results = recipe_config = None
    results_path = args.results or os.path.join(os.path.dirname(folder) if folder != run_dir else run_dir, "results.json")
    if os.path.isfile(results_path):
        with open(results_path) as fh:
            results = json.load(fh)
    config_path = os.path.join(os.path.dirname(results_path), "recipe_config.yaml")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            recipe_config = fh.read()
    path = write_model_card(folder, repo_id=args.repo_id, results=results, recipe_config=recipe_config,
                            command=args.training_command or (results or {}).get("command"),
                            base_model=args.base_model, dataset=args.dataset)
    print(f"model card: {path}" + ("" if results else " (no results.json found: no accuracy section)"))
    return 0


def _push(args) -> int:
    from .hub import push_folder

    info = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.commit_message, create_pr=args.create_pr)
    print(f"pushed {args.folder} to {args.repo_id}: commit {info.oid}" + (f", pull request {info.pr_url}" if info.pr_url else ""))
    return 0


def _download(args) -> int:
    from .hub import download

    print(download(args.repo_id, revision=args.revision, local_dir=args.local_dir, cache_dir=args.cache_dir))
    return 0


def _export(args) -> int:
    import torch

    from .deploy import convert_for_inference, export_onnx

    source = args.model
    folder = source[len("local-dir:"):] if source.startswith("local-dir:") else source
    config = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as fh:
            config = json.load(fh)
    if source.startswith("hf-hub:") or "architecture" in config:  # timm's save_for_hf layout
        import timm

        from .data import resolve_data_config

        model = timm.create_model(source if source.startswith("hf-hub:") else f"local-dir:{folder}", deploy=True)
        example = torch.randn(args.batch_size, *resolve_data_config(model, args.input_size)["input_size"])
    else:  # a transformers checkpoint folder
        from transformers import AutoModel

        model = convert_for_inference(AutoModel.from_pretrained(folder))
        ids = torch.ones(args.batch_size, args.seq_len, dtype=torch.long)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = export_onnx(model, example, args.out, dynamic_batch=not args.static_batch, verify=not args.no_verify)
    checked = "" if args.no_verify else f"; onnxruntime vs PyTorch: relative L2 error {result['rel_l2']:.2g}"
    print(f"wrote {args.out} ({result['bytes']:,} bytes){checked}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="adq-hf", description="adq_hf command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)

    sens = sub.add_parser("sensitivity", help="per-layer sensitivity, a bit allocation and its report")
    _model_and_data_arguments(sens, num_batches=2)
    sens.add_argument("--method", choices=["ggn", "hutchinson", "fisher"], default="ggn",
                      help="ggn: Gauss-Newton trace (default); hutchinson: Hessian trace by double backward (20x slower)")
    sens.add_argument("--max-iters", type=int, help="probes per batch (default: 20 for ggn, 50 for hutchinson)")
    sens.add_argument("--target-avg-bits", type=float)
    sens.add_argument("--max-bytes", type=int)
    sens.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 8])
    sens.add_argument("--weight-bits", type=int, default=4, help="bits of every body layer when no budget is given")
    sens.add_argument("--weight-quantizer", default="adq")
    sens.add_argument("--granularity", default="per_tensor")
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--no-progress", action="store_true", help="no progress bar")
    sens.add_argument("--out", default="bit_report")
    sens.set_defaults(handler=_sensitivity)

    ptq = sub.add_parser("ptq", help="one-shot post-training quantization of a timm model; saves it")
    _model_and_data_arguments(ptq, num_batches=16)
    ptq.add_argument("--bits", type=int, default=4, help="weight bits of the body layers")
    ptq.add_argument("--activation-bits", type=int, default=None, help="default: float activations")
    ptq.add_argument("--method", choices=["rtn", "gptq", "obq", "sa"], default="sa")
    ptq.add_argument("--weight-quantizer", default="adq")
    ptq.add_argument("--granularity", default="per_channel")
    ptq.add_argument("--seed", type=int, default=0)
    ptq.add_argument("--no-progress", action="store_true")
    ptq.add_argument("--out", required=True, help="folder for the quantized model (adq_hf.save_pretrained)")
    ptq.set_defaults(handler=_ptq)

    card = sub.add_parser("card", help="render README.md (model card) for a saved model or a recipe run")
    card.add_argument("run_dir", help="a recipe output folder (with final/ and results.json) or a saved model folder")
    card.add_argument("--results", help="results.json with measured metrics (default: the recipe's)")
    card.add_argument("--repo-id", help="the Hub repo the card will live in (used in the loading snippet)")
    card.add_argument("--base-model", help="Hub id of the float model it was quantized from")
    card.add_argument("--dataset", help="dataset id (default: the recipe's data.source)")
    card.add_argument("--training-command", help="the exact command that trained it")
    card.set_defaults(handler=_card)

    push = sub.add_parser("push", help="upload a saved quantized model folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to commit to (created from main if missing)")
    push.add_argument("--commit-message", default="Upload quantized model (adq_hf)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.set_defaults(handler=_push)

    down = sub.add_parser("download", help="download a quantized model from the Hub; prints its folder")
    down.add_argument("repo_id")
    down.add_argument("--revision", help="branch, tag or commit")
    down.add_argument("--local-dir")
    down.add_argument("--cache-dir")
    down.set_defaults(handler=_download)

    export = sub.add_parser("export", help="export a quantized checkpoint to ONNX (look-up-table form), checked in onnxruntime")
    export.add_argument("model", help="a saved folder (timm or transformers), local-dir:PATH or hf-hub:org/name (timm)")
    export.add_argument("out", help="the .onnx file to write")
    export.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="timm models: example input size (default: the model's data config)")
    export.add_argument("--seq-len", type=int, default=128, help="transformers models: example sequence length")
    export.add_argument("--batch-size", type=int, default=1, help="example batch size")
    export.add_argument("--static-batch", action="store_true", help="a fixed batch size instead of a dynamic batch axis")
    export.add_argument("--no-verify", action="store_true", help="do not run the file in onnxruntime")
    export.set_defaults(handler=_export)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, RuntimeError) as err:  # OSError includes huggingface_hub's HTTP errors
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
