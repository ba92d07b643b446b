"""``adq-hf``: command-line entry points.

    adq-hf sensitivity resnet20_cifar --in-chans 1 --num-classes 10 --checkpoint teacher.safetensors \\
        --dataset fashion_mnist --input-size 1 28 28 --target-avg-bits 2.8 --out report/
"""

from __future__ import annotations

import argparse
import json
import sys


def _sensitivity(args) -> int:
    import timm
    from torch.utils.data import DataLoader

    from . import ADQConfig
    from .data import collate_images, image_transforms, load_image_dataset, resolve_data_config
    from .mixed_precision import allocate_bits, estimate_sensitivity, write_report
    from .surgery import plan_quantization, quantize_model

    model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    if args.checkpoint:
        from safetensors.torch import load_file

        if not args.checkpoint.endswith(".safetensors"):
            raise ValueError(f"--checkpoint {args.checkpoint}: only .safetensors state dicts are loaded.")
        model.load_state_dict(load_file(args.checkpoint))
    resolved = resolve_data_config(model, args.input_size)
    dataset = load_image_dataset(args.dataset, args.split).shuffle(seed=args.seed)
    dataset = dataset.select(range(min(len(dataset), args.batch_size * args.num_batches)))
    dataset.set_transform(image_transforms(resolved, "none")[1])
    batches = list(DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_images))
    config = ADQConfig(weight_bits=args.candidates[0], weight_quantizer=args.weight_quantizer,
                       granularity=args.granularity)
    body = [p.name for p in plan_quantization(model, config) if p.role == "body"]
    fixed = {p.name: p.weight_bits for p in plan_quantization(model, config) if p.role != "body"}
    sensitivity = estimate_sensitivity(model, batches, method=args.method, num_batches=len(batches),
                                       max_iters=args.max_iters, seed=args.seed, layers=body)
    if args.target_avg_bits or args.max_bytes:
        bits = allocate_bits(model, sensitivity, target_avg_bits=args.target_avg_bits, max_bytes=args.max_bytes,
                             candidates=args.candidates, config=config, fixed=fixed)
    else:
        bits = {name: config.weight_bits for name in body}
    config.layer_bits = bits
    quantize_model(model, config)
    paths = write_report(model, sensitivity, args.out)
    print(open(paths["md"]).read())
    print(f"layer_bits for ADQConfig (also in {paths['json']}):")
    print(json.dumps(bits))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="adq-hf", description="adq_hf command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)

    sens = sub.add_parser("sensitivity", help="per-layer sensitivity, a bit allocation and its report")
    sens.add_argument("model", help="timm model name")
    sens.add_argument("--checkpoint", help="float weights (.safetensors state dict)")
    sens.add_argument("--num-classes", type=int, default=None)
    sens.add_argument("--in-chans", type=int, default=3)
    sens.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    sens.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist, an image folder or a Hub id")
    sens.add_argument("--split", default="train")
    sens.add_argument("--batch-size", type=int, default=64)
    sens.add_argument("--num-batches", type=int, default=2)
    sens.add_argument("--method", choices=["hutchinson", "fisher"], default="hutchinson")
    sens.add_argument("--max-iters", type=int, default=50)
    sens.add_argument("--target-avg-bits", type=float)
    sens.add_argument("--max-bytes", type=int)
    sens.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 8])
    sens.add_argument("--weight-quantizer", default="adq")
    sens.add_argument("--granularity", default="per_tensor")
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--out", default="bit_report")
    sens.set_defaults(handler=_sensitivity)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
