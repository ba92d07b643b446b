#!/usr/bin/env python
"""B2: post-training quantization -- RTN, GPTQ, OBQ and sensitivity-aware PTQ side by side.

    python benchmarks/ptq.py --tier standard [--parts resnet minilm] [--bits 4 3 2]

ResNet-20 / Fashion-MNIST: the recipes' FP teacher, 1,024 calibration images from the training
split, per-output-channel ADQ codebook weights (first conv and classifier 8-bit), activations
float; wall time of each method and its ratio to OBQ in the same run, total layer reconstruction
error, top-1 on the test set after BatchNorm re-estimation. MiniLM: every Linear layer, calibration
and evaluation on disjoint sets of real sentences (Debian fortunes-min), fidelity = mean cosine
similarity of mean-pooled embeddings to the FP model. Results: benchmarks/results/ptq_<tier>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, fmnist_teacher, run_record, sentence_batches, sentence_embeddings, write_results  # noqa: E402

METHODS = {"rtn": {}, "gptq": {}, "sa": {}, "sa-taylor": {"sensitivity": "taylor"}, "obq": {},
           "obq-pure": {"outliers": False}}
TIERS = {
    "quick": {"calib": 128, "eval": 512, "sentences": 16, "bits": [3], "minilm_layers": 2,
              "teacher": ["teacher.epochs=1", "data.train_limit=2048", "optim.warmup_steps=2"]},  # minutes, not 2 epochs
    "standard": {"calib": 1024, "eval": 10000, "sentences": 128, "bits": [4, 3, 2], "minilm_layers": None},
}


def resnet_rows(tier: dict, bits_list, methods, cache_dir=None):
    import timm
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    import adq_hf
    from adq_hf import ADQConfig
    from adq_hf.data import collate_images, image_transforms, load_image_dataset, resolve_data_config
    from adq_hf.ptq import quantize

    teacher = fmnist_teacher(cache_dir, tier.get("teacher"))

    def float_model():
        model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
        model.load_state_dict(load_file(teacher))
        return model.eval()

    resolved = resolve_data_config(float_model(), (1, 28, 28))
    transform = image_transforms(resolved, "none")[1]
    train = load_image_dataset("fashion_mnist", "train").shuffle(seed=0).select(range(tier["calib"]))
    test = load_image_dataset("fashion_mnist", "test").select(range(tier["eval"]))
    train.set_transform(transform)
    test.set_transform(transform)
    calibration = list(DataLoader(train, batch_size=128, collate_fn=collate_images))
    test_loader = DataLoader(test, batch_size=500, collate_fn=collate_images)

    @torch.no_grad()
    def top1(model):
        model.eval()
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in test_loader)
        return correct / len(test)

    rows = [{"model": "resnet20", "bits": "fp", "method": "fp", "top1": top1(float_model())}]
    for bits in bits_list:
        for method in methods:
            model = float_model()
            config = ADQConfig(weight_bits=bits, activation_bits=None, granularity="per_channel")
            started = time.perf_counter()
            quantize(model, calibration, config, method=method.split("-")[0], progress=False, **METHODS[method])
            wall = time.perf_counter() - started
            report = model.ptq_report
            rows.append({"model": "resnet20", "bits": bits, "method": method, "wall_s": wall,
                         "solver_s": sum(r["seconds"] for r in report.values()),
                         "recon_error": sum(r["error"] for r in report.values()),
                         "rtn_recon_error": sum(r["rtn_error"] for r in report.values()),
                         "top1": top1(model), "avg_bits": adq_hf.average_weight_bits(model)})
            print(rows[-1], flush=True)
    return rows


def minilm_rows(tier: dict, bits_list, methods):
    from transformers import AutoModel, AutoTokenizer

    from adq_hf import ADQConfig
    from adq_hf.data import english_sentences, minilm_path
    from adq_hf.ptq import quantize

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    n = tier["sentences"]
    calib_text, eval_text = english_sentences(n), english_sentences(n, offset=n)
    calibration = sentence_batches(tokenizer, calib_text, 32)
    evaluation = sentence_batches(tokenizer, eval_text, n)  # one batch

    reference = sentence_embeddings(AutoModel.from_pretrained(path).eval(), evaluation)
    rows = []
    for bits in bits_list:
        for method in methods:
            if method.startswith("obq"):  # O(rows * cols^3): 1.4e12 multiply-adds for one 1536-column layer
                continue
            model = AutoModel.from_pretrained(path).eval()
            config = ADQConfig(weight_bits=bits, activation_bits=None, granularity="per_channel")
            if tier["minilm_layers"]:
                config.modules_to_not_convert = [f"encoder.layer.{i}" for i in range(tier["minilm_layers"], 6)] + ["pooler"]
            started = time.perf_counter()
            quantize(model, calibration, config, method=method.split("-")[0], progress=False, **METHODS[method])
            wall = time.perf_counter() - started
            report = model.ptq_report
            cosine = float((sentence_embeddings(model, evaluation) * reference).sum(-1).mean())
            rows.append({"model": "minilm", "bits": bits, "method": method, "wall_s": wall,
                         "solver_s": sum(r["seconds"] for r in report.values()),
                         "recon_error": sum(r["error"] for r in report.values()),
                         "rtn_recon_error": sum(r["rtn_error"] for r in report.values()), "cosine": cosine})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--parts", nargs="+", choices=["resnet", "minilm"], default=["resnet", "minilm"])
    parser.add_argument("--bits", nargs="+", type=int, default=None)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache-dir", default=None, help="teacher cache (default ~/.cache/adq_hf)")
    args = parser.parse_args(argv)
    tier = TIERS[args.tier]
    bits = args.bits or tier["bits"]
    rows = []
    if "resnet" in args.parts:
        rows += resnet_rows(tier, bits, args.methods, args.cache_dir)
    if "minilm" in args.parts:
        rows += minilm_rows(tier, [b for b in bits if b >= 3], args.methods)
    for row in rows:  # ratio to OBQ in the same run, same model and bits
        obq = next((r for r in rows if r["model"] == row["model"] and r["bits"] == row["bits"] and r["method"] == "obq"), None)
        if obq and "wall_s" in row:
            row["obq_wall_over_this"] = obq["wall_s"] / row["wall_s"]
            row["obq_solver_over_this"] = obq["solver_s"] / row["solver_s"] if row["solver_s"] > 0 else None
    result = {"benchmark": "B2 post-training quantization", "tier": args.tier, "settings": tier, "rows": rows,
              **run_record("ptq.py", argv)}
    lines = ["| model | bits | method | wall (s) | OBQ wall / this | solver (s) | recon. error | RTN recon. error | top-1 / cosine |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        quality = f"{100 * r['top1']:.2f}%" if "top1" in r else f"{r['cosine']:.4f}"
        ratio = r.get("obq_wall_over_this")
        lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r.get('wall_s', 0):.2f} | "
                     f"{'' if ratio is None else f'{ratio:.1f}x'} | {r.get('solver_s', 0):.2f} | "
                     f"{r.get('recon_error', 0):.4g} | {r.get('rtn_recon_error', 0):.4g} | {quality} |")
    write_results(args.out, f"ptq_{args.tier}", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
