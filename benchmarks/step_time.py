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
    sensitivity = sensitivity_comparison(args.tier)
    result = {
        "benchmark": "B4 step time", "tier": args.tier, "model": "resnet20_cifar 1x28x28", "batch": 128,
        "median_step_s": medians, "ratio_to_fp": {n: medians[n] / medians["fp"] for n in medians},
        "samples_per_method": len(times["fp"]), "fp_params": fp_params,
        "quantizer_params": extra_params,  # the quantizers' own parameters (ASQ: its adapters)
        "mixed_precision_s": {"sensitivity": sensitivity["seconds"]["ggn"], "allocation": sensitivity["allocation_s"]["ggn"]},
        "sensitivity": sensitivity,
        "init": speed_rows(args.tier),
        **run_record("step_time.py", argv),
    }
    lines = ["| method | median step (s) | ratio to FP | quantizer parameters (% of FP) |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {medians[n]:.3f} | {medians[n] / medians['fp']:.2f} | "
              f"{extra_params[n]:,} ({100 * extra_params[n] / fp_params:.2f}%) |" for n in medians]
    lines += [""] + sensitivity_lines(sensitivity)
    lines += ["", "Weight-quantizer initialisation (`init_from`), one Qwen2.5-0.5B-shaped decoder layer's Linear weights "
              "(benchmarks/codebook_init.py):", "", *speed_markdown(result["init"], REFERENCE_COMMIT)]
    lines += ["", f"Command: `{result['command']}` (commit {result['commit']}, {result['machine']['threads']} threads)"]
    write_results(args.out, f"step_time_{args.tier}", result, lines)
    return 0


def sensitivity_comparison(tier: str) -> dict:
    """Mixed-precision planning for ``target_avg_bits=2.8`` on one batch of 128: each sensitivity
    estimator's time (the Gauss-Newton default and Hutchinson, the previous default, each with its
    default probes), the exact per-layer trace (one backward per class: for this ReLU network each
    layer's Hessian block is its Gauss-Newton block, so both estimators aim at it), Spearman rank
    correlations, the MILP allocation from each and how many layers it puts at other bits.

    Standard: the recipes' trained FP teacher and a real Fashion-MNIST training batch (on random
    weights the Hessian traces are noise, docs/mixed_precision.md); quick: random weights and inputs,
    5 Hutchinson probes (checks that it runs)."""
    import timm
    from scipy.stats import spearmanr

    from adq_hf.mixed_precision import allocate_bits, estimate_sensitivity, exact_gauss_newton_traces, weight_layers

    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    if tier == "standard":
        from safetensors.torch import load_file

        from common import fmnist_teacher
        from adq_hf.data import collate_images, image_transforms, load_image_dataset, resolve_data_config

        model.load_state_dict(load_file(fmnist_teacher()))
        data = load_image_dataset("fashion_mnist", "train").shuffle(seed=0).select(range(128))
        data.set_transform(image_transforms(resolve_data_config(model, (1, 28, 28)), "none")[1])
        batch = collate_images([data[i] for i in range(128)])
    else:
        batch = (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))
    model.eval()
    body = list(weight_layers(model))[1:-1]  # first conv and classifier stay at 8 bits
    fixed = {n: 8 for n in weight_layers(model) if n not in body}
    hutchinson_probes = {"max_iters": 5} if tier == "quick" else {}
    runs = {"ggn": {"method": "ggn"}, "hutchinson": {"method": "hutchinson", **hutchinson_probes}}
    if tier == "standard":
        runs["hutchinson_seed1"] = {"method": "hutchinson", "seed": 1}
    values, seconds = {}, {}
    for name, kwargs in runs.items():
        start = time.perf_counter()
        values[name] = estimate_sensitivity(model, [batch], layers=body, progress=False, **kwargs)
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    values["exact"] = exact_gauss_newton_traces(model, batch, layers=body)
    seconds["exact"] = time.perf_counter() - start
    config = ADQConfig(weight_bits=2, activation_bits=2)
    allocations, allocation_s = {}, {}
    for name, sens in values.items():
        start = time.perf_counter()
        allocations[name] = allocate_bits(model, sens, target_avg_bits=2.8, config=config, fixed=fixed)
        allocation_s[name] = time.perf_counter() - start
    pairs = [("ggn", "hutchinson"), ("ggn", "exact"), ("hutchinson", "exact"), ("hutchinson", "hutchinson_seed1")]
    spearman = {f"{a}~{b}": float(spearmanr([values[a][n] for n in body], [values[b][n] for n in body])[0])
                for a, b in pairs if a in values and b in values}
    differ = {f"{a}~{b}": sum(allocations[a][n] != allocations[b][n] for n in body)
              for a, b in pairs if a in values and b in values}
    return {"layers": len(body), "batch": 128, "model": "trained teacher" if tier == "standard" else "random init",
            "seconds": seconds, "time_ratio_hutchinson_to_ggn": seconds["hutchinson"] / seconds["ggn"],
            "spearman": spearman, "allocation_layers_differing": differ, "allocation_s": allocation_s,
            "values": values, "allocations": allocations}


def sensitivity_lines(comparison: dict) -> list:
    c = comparison
    lines = [f"Mixed-precision planning for 2.8 average bits on one batch of {c['batch']} ({c['model']}, "
             f"{c['layers']} body layers):", "",
             "| sensitivity | time (s) | Spearman to exact | allocation: layers differing from exact's |",
             "|---|---:|---:|---:|"]
    for name, seconds in c["seconds"].items():
        rho = 1.0 if name == "exact" else c["spearman"].get(f"{name}~exact")
        differ = 0 if name == "exact" else c["allocation_layers_differing"].get(f"{name}~exact")
        lines.append(f"| {name} | {seconds:.2f} | {'' if rho is None else f'{rho:.3f}'} | "
                     f"{'' if differ is None else differ} |")
    lines += ["", f"Hutchinson time / Gauss-Newton time: {c['time_ratio_hutchinson_to_ggn']:.1f}x; "
              f"Spearman Gauss-Newton to Hutchinson {c['spearman']['ggn~hutchinson']:.3f}"
              + (f", Hutchinson seed 0 to seed 1 {c['spearman']['hutchinson~hutchinson_seed1']:.3f}"
                 if "hutchinson~hutchinson_seed1" in c["spearman"] else "")
              + f"; 2.8-bit allocations differ in {c['allocation_layers_differing']['ggn~hutchinson']} of "
              f"{c['layers']} layers between the two; MILP allocation {c['allocation_s']['ggn']:.2f} s."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
