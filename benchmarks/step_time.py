#!/usr/bin/env python
"""B4 (part): QAT training-step time over FP step time, same run, same machine.

    python benchmarks/step_time.py [--tier quick|standard] [--compile] [--out benchmarks/results]

ResNet-20 on 1x28x28 inputs at batch 128 (the Fashion-MNIST protocol) and timm's ResNet-18 at
3x224x224, batch 32 (the ImageNet shape; 3x64x64, batch 4 in the quick tier), SGD step with
cross-entropy. Methods are interleaved round by round so machine drift hits all of them alike;
the report gives medians and ratios to FP of the same model, by wall clock and by process CPU
time (the CPU time excludes waiting for a core, so it is the steadier of the two on a shared
machine). ``--compile`` adds ResNet-20 rows with ``torch.compile`` (inductor; the recipe's
``train.compile=true``): the compile time of each model and its step against the compiled and the
eager FP step. Also the sensitivity estimators' comparison and the weight
quantizers' initialisation speed (``init`` rows: benchmarks/codebook_init.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, Tuple

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
COMPILED = ("fp", "adq_w2a2", "lsq_w2a2", "asq_post_w2a2")


@dataclass(frozen=True)
class Model:
    name: str  # timm model
    num_classes: int
    input: Tuple[int, int, int]
    batch: int
    quick_input: Tuple[int, int, int]
    quick_batch: int


MODELS = {
    "resnet20": Model("resnet20_cifar", 10, (1, 28, 28), 128, (1, 28, 28), 128),
    "resnet18": Model("resnet18", 1000, (3, 224, 224), 32, (3, 64, 64), 4),
}
TIERS = {"quick": {"resnet20": (2, 2), "resnet18": (2, 1)},  # (rounds, timed steps per round)
         "standard": {"resnet20": (7, 5), "resnet18": (3, 2)}}


def brevitas_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("brevitas") is not None


def build(spec: Model, config, x):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(spec.name, num_classes=spec.num_classes, in_chans=x.shape[1])
    if config == "brevitas":
        import brevitas_peer

        brevitas_peer.convert(model, 2, 2, calibration_batches=[x])
        brevitas_peer.calibrate(model, [x])
    elif config is not None:
        adq_hf.quantize_model(model, ADQConfig.from_dict(config.to_dict()), calibration_data=[x])
    return model.train()


def time_steps(models: Dict[str, torch.nn.Module], x, y, rounds: int, steps: int):
    """``{name: (wall medians, cpu medians)}`` of SGD steps, methods interleaved round by round."""
    optims = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            opt = optims[name]
            for step in range(steps + 1):  # first step of a round is a warm-up
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()},
            len(wall["fp"]))


def measure_model(key: str, tier: str) -> dict:
    spec = MODELS[key]
    rounds, steps = TIERS[tier][key]
    shape, batch = (spec.quick_input, spec.quick_batch) if tier == "quick" else (spec.input, spec.batch)
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, spec.num_classes, (batch,))
    methods = {n: c for n, c in METHODS.items() if c != "brevitas" or brevitas_available()}
    models = {name: build(spec, cfg, x) for name, cfg in methods.items()}
    wall, cpu, samples = time_steps(models, x, y, rounds, steps)
    fp_params = sum(p.numel() for p in models["fp"].parameters())
    return {"model": spec.name, "input": list(shape), "batch": batch, "median_step_s": wall, "median_cpu_s": cpu,
            "ratio_to_fp": {n: wall[n] / wall["fp"] for n in wall}, "cpu_ratio_to_fp": {n: cpu[n] / cpu["fp"] for n in cpu},
            "samples_per_method": samples, "fp_params": fp_params,
            # the quantizers' own parameters (ASQ: its adapters)
            "quantizer_params": {n: sum(p.numel() for p in m.parameters()) - fp_params for n, m in models.items()}}


def measure_compiled(tier: str) -> dict:
    """ResNet-20 under ``torch.compile`` (inductor): compile time (the first step) and step medians
    against the compiled and the eager FP step of the same run."""
    spec = MODELS["resnet20"]
    rounds, steps = TIERS[tier]["resnet20"]
    torch.manual_seed(0)
    x, y = torch.randn(spec.batch, *spec.input), torch.randint(0, spec.num_classes, (spec.batch,))
    eager = {"fp": build(spec, None, x)}
    compiled, compile_s = {}, {}
    for name in COMPILED:
        model = torch.compile(build(spec, METHODS[name], x))
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        compile_s[name] = time.perf_counter() - start
        compiled[name] = model
    wall, cpu, samples = time_steps({"eager_fp": eager["fp"], **compiled}, x, y, rounds, steps)
    return {"model": spec.name, "batch": spec.batch, "compile_s": compile_s, "median_step_s": wall, "median_cpu_s": cpu,
            "ratio_to_compiled_fp": {n: wall[n] / wall["fp"] for n in COMPILED},
            "cpu_ratio_to_compiled_fp": {n: cpu[n] / cpu["fp"] for n in COMPILED},
            "ratio_to_eager_fp": {n: wall[n] / wall["eager_fp"] for n in COMPILED}, "samples_per_method": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes of compilation)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    models = {key: measure_model(key, args.tier) for key in MODELS}
    compiled = measure_compiled(args.tier) if args.compile else None
    sensitivity = sensitivity_comparison(args.tier)
    result = {
        "benchmark": "B4 step time", "tier": args.tier, "models": models, "compiled": compiled,
        "mixed_precision_s": {"sensitivity": sensitivity["seconds"]["ggn"], "allocation": sensitivity["allocation_s"]["ggn"]},
        "sensitivity": sensitivity,
        "init": speed_rows(args.tier),
        **run_record("step_time.py", argv),
    }
    lines = []
    for key, m in models.items():
        lines += [f"**{m['model']}** {'x'.join(map(str, m['input']))}, batch {m['batch']} "
                  f"({m['samples_per_method']} steps per method):", "",
                  "| method | median step (s) | step / FP (wall) | step / FP (CPU time) | quantizer parameters (% of FP) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {m['median_step_s'][n]:.3f} | {m['ratio_to_fp'][n]:.2f} | {m['cpu_ratio_to_fp'][n]:.2f} | "
                  f"{m['quantizer_params'][n]:,} ({100 * m['quantizer_params'][n] / m['fp_params']:.2f}%) |"
                  for n in m["median_step_s"]]
        lines.append("")
    if compiled:
        lines += [f"**torch.compile (inductor)**, {compiled['model']} batch {compiled['batch']}:", "",
                  "| method | compile (s) | median step (s) | step / compiled FP | step / compiled FP (CPU time) | "
                  "step / eager FP |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {compiled['compile_s'][n]:.0f} | {compiled['median_step_s'][n]:.3f} | "
                  f"{compiled['ratio_to_compiled_fp'][n]:.2f} | {compiled['cpu_ratio_to_compiled_fp'][n]:.2f} | "
                  f"{compiled['ratio_to_eager_fp'][n]:.2f} |" for n in COMPILED]
        lines.append("")
    lines += sensitivity_lines(sensitivity)
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
