#!/usr/bin/env python
"""B1 (first rows): Fashion-MNIST ResNet-20 accuracy against bits, every row under one budget.

    python benchmarks/qat_accuracy.py --tier standard [--rows w2a2 w2a3 w3a3 mixed2.8 w4a4] [--epochs 1]

Each row runs ``recipes/qat_imagenet.py`` with its ``recipes/configs/fmnist_resnet20_*.yaml``
and the same overrides (teacher epochs, QAT epochs, seed), so every row shares one cached FP
teacher and one training budget. Rows already finished are reused (the run is resumable row by
row); results go to ``benchmarks/results/qat_accuracy_<tier>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "w2a2": "fmnist_resnet20_w2a2.yaml",
    "w2a3": "fmnist_resnet20_w2a3.yaml",
    "w3a3": "fmnist_resnet20_w3a3.yaml",
    "mixed2.8": "fmnist_resnet20_mixed2.8.yaml",
    "w4a4": "fmnist_resnet20_w4a4.yaml",
}
TIERS = {  # overrides shared by every row
    "quick": ["teacher.epochs=1", "data.train_limit=512", "data.eval_limit=256", "data.batch_size=32",
              "optim.epochs=1", "optim.warmup_steps=2", "calibration.num_batches=1"],
    "standard": ["teacher.epochs=2", "optim.warmup_steps=30"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--epochs", type=float, default=1.0, help="QAT epochs for every row")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "outputs", "benchmarks"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache-dir", default=None, help="teacher cache (default ~/.cache/adq_hf)")
    args = parser.parse_args(argv)
    overrides = TIERS[args.tier] + [f"optim.epochs={args.epochs}"]
    if args.cache_dir:
        overrides.append(f"cache_dir={args.cache_dir}")
    rows = {}
    for row in args.rows:
        out = os.path.join(args.work_dir, args.tier, row)
        done = os.path.join(out, "results.json")
        if not os.path.isfile(done):
            cmd = [sys.executable, os.path.join(ROOT, "recipes", "qat_imagenet.py"), "--config",
                   os.path.join(ROOT, "recipes", "configs", ROWS[row]), "--output-dir", out, "--set", *overrides]
            started = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            print(f"{row}: {time.time() - started:.0f} s")
        with open(done) as fh:
            rows[row] = json.load(fh)
    result = {
        "benchmark": "B1 accuracy vs bits (Fashion-MNIST, ResNet-20)", "tier": args.tier, "qat_epochs": args.epochs,
        "shared_overrides": overrides,
        "rows": {r: {k: v[k] for k in ("fp_top1", "top1", "top5", "average_weight_bits", "epoch_time_s")}
                 | {"activation_bits": v["quantization_config"]["activation_bits"],
                    "bit_map": {n: b["weight_bits"] for n, b in v["bit_map"].items()}} for r, v in rows.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/qat_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"qat_accuracy_{args.tier}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    lines = ["| row | avg weight bits | activation bits | top-1 | FP top-1 | gap | QAT epoch time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r, v in result["rows"].items():
        lines.append(f"| {r} | {v['average_weight_bits']:.2f} | {v['activation_bits']} | {100 * v['top1']:.2f} | "
                     f"{100 * v['fp_top1']:.2f} | {100 * (v['top1'] - v['fp_top1']):+.2f} | "
                     f"{', '.join(f'{t:.0f}' for t in v['epoch_time_s'])} |")
    with open(stem + ".md", "w") as fh:
        fh.write(f"Command: `{result['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
