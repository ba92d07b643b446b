#!/usr/bin/env python
"""B4 (part): QAT training-step time over FP step time, same run, same machine.

    python benchmarks/step_time.py [--tier quick|standard] [--out benchmarks/results]

ResNet-20 on 1x28x28 inputs at batch 128 (the Fashion-MNIST protocol), SGD step with
cross-entropy. Methods are interleaved round by round so machine drift hits all of them alike;
the report gives medians and ratios to FP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import adq_hf
from adq_hf import ADQConfig

METHODS = {
    "fp": None,
    "adq_w2a2": ADQConfig(weight_bits=2, activation_bits=2),
    "adq_w2_weight_only": ADQConfig(weight_bits=2),
    "lsq_w2a2": ADQConfig(weight_bits=2, activation_bits=2, weight_quantizer="lsq", activation_quantizer="lsq"),
}


def build(config, x):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    if config is not None:
        adq_hf.quantize_model(model, ADQConfig.from_dict(config.to_dict()), calibration_data=[x])
    return model.train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=["quick", "standard"], default="standard")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    rounds, steps = (2, 2) if args.tier == "quick" else (7, 5)
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    models = {name: build(cfg, x) for name, cfg in METHODS.items()}
    optims = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    times = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name, model in models.items():
            opt = optims[name]
            for step in range(steps + 1):  # first step of a round is a warm-up
                start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "B4 step time", "tier": args.tier, "model": "resnet20_cifar 1x28x28", "batch": 128,
        "median_step_s": medians, "ratio_to_fp": {n: medians[n] / medians["fp"] for n in medians},
        "samples_per_method": len(times["fp"]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "commit": _commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_time_{args.tier}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    lines = ["| method | median step (s) | ratio to FP |", "|---|---:|---:|"]
    lines += [f"| {n} | {medians[n]:.3f} | {medians[n] / medians['fp']:.2f} |" for n in medians]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
