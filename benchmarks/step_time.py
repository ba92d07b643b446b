#!/usr/bin/env python
"""B4 (part): QAT training-step time over FP step time, same run, same machine.

    python benchmarks/step_time.py [--tier quick|standard] [--out benchmarks/results]

ResNet-20 on 1x28x28 inputs at batch 128 (the Fashion-MNIST protocol), SGD step with
cross-entropy. Methods are interleaved round by round so machine drift hits all of them alike;
the report gives medians and ratios to FP. Also the weight quantizers' initialisation speed
(``init`` rows: benchmarks/codebook_init.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import adq_hf
from adq_hf import ADQConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from codebook_init import REFERENCE_COMMIT, speed_markdown, speed_rows  # noqa: E402
from common import run_record, write_results  # noqa: E402

METHODS = {
    "fp": None,
    "adq_w2a2": ADQConfig(weight_bits=2, activation_bits=2),
    "adq_w2_weight_only": ADQConfig(weight_bits=2),
    "lsq_w2a2": ADQConfig(weight_bits=2, activation_bits=2, weight_quantizer="lsq", activation_quantizer="lsq"),
    "asq_post_w2a2": ADQConfig(weight_bits=2, activation_bits=2, weight_quantizer="post", activation_quantizer="asq"),
    "brevitas_w2a2": "brevitas",  # the peer library (optional `bench` extra; skipped when not installed)
}


def brevitas_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("brevitas") is not None


def build(config, x):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    if config == "brevitas":
        import brevitas_peer

        brevitas_peer.convert(model, 2, 2, calibration_batches=[x])
        brevitas_peer.calibrate(model, [x])
    elif config is not None:
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
    methods = {n: c for n, c in METHODS.items() if c != "brevitas" or brevitas_available()}
    models = {name: build(cfg, x) for name, cfg in methods.items()}
    optims = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    times = {name: [] for name in methods}
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
    fp_params = sum(p.numel() for p in models["fp"].parameters())
    extra_params = {name: sum(p.numel() for p in m.parameters()) - fp_params for name, m in models.items()}
    sensitivity_s, allocation_s = time_mixed_precision(x, y, max_iters=5 if args.tier == "quick" else 50)
    result = {
        "benchmark": "B4 step time", "tier": args.tier, "model": "resnet20_cifar 1x28x28", "batch": 128,
        "median_step_s": medians, "ratio_to_fp": {n: medians[n] / medians["fp"] for n in medians},
        "samples_per_method": len(times["fp"]), "fp_params": fp_params,
        "quantizer_params": extra_params,  # the quantizers' own parameters (ASQ: its adapters)
        "mixed_precision_s": {"sensitivity": sensitivity_s, "allocation": allocation_s},
        "init": speed_rows(args.tier),
        **run_record("step_time.py", argv),
    }
    lines = ["| method | median step (s) | ratio to FP | quantizer parameters (% of FP) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {medians[n]:.3f} | {medians[n] / medians['fp']:.2f} | "
              f"{extra_params[n]:,} ({100 * extra_params[n] / fp_params:.2f}%) |" for n in medians]
    lines += ["", f"Mixed precision for 2.8 average bits on one batch of 128 (`plan_mixed_precision`): Hutchinson "
              f"sensitivity {sensitivity_s:.2f} s, MILP allocation {allocation_s:.2f} s.", "",
              "Weight-quantizer initialisation (`init_from`), one Qwen2.5-0.5B-shaped decoder layer's Linear weights "
              "(benchmarks/codebook_init.py):", "", *speed_markdown(result["init"], REFERENCE_COMMIT), "",
              f"Command: `{result['command']}` (commit {result['commit']}, {result['machine']['threads']} threads)"]
    write_results(args.out, f"step_time_{args.tier}", result, lines)
    return 0


def time_mixed_precision(x, y, max_iters: int):
    """Seconds for the Hutchinson sensitivity and the exact MILP allocation of ``target_avg_bits=2.8``."""
    import timm

    from adq_hf.mixed_precision import allocate_bits, estimate_sensitivity, weight_layers

    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    body = list(weight_layers(model))[1:-1]  # first conv and classifier stay at 8 bits
    start = time.perf_counter()
    sensitivity = estimate_sensitivity(model, [(x, y)], max_iters=max_iters, layers=body, progress=False)
    middle = time.perf_counter()
    allocate_bits(model, sensitivity, target_avg_bits=2.8, config=ADQConfig(weight_bits=2, activation_bits=2),
                  fixed={n: 8 for n in weight_layers(model) if n not in body})
    return middle - start, time.perf_counter() - middle


if __name__ == "__main__":
    sys.exit(main())
