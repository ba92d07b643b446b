#!/usr/bin/env python
"""B4 (part): weight-quantizer initialisation speed, and the ADQ codebook's quantization error
against the implementation it replaced.

    python benchmarks/codebook_init.py --tier quick|standard [--reference COMMIT] [--out benchmarks/results]

* Speed (``speed_rows``, also in ``benchmarks/step_time.py``'s B4 result): parameters per second of
  ``init_from`` (one thread) on the Linear weights of one decoder layer with Qwen2.5-0.5B's shapes
  (q/o 896x896, k/v 128x896, gate/up 4864x896, down 896x4864; 14.9M parameters, random normal x 0.02;
  the quick tier divides every dimension by 4), for ADQ per channel / per tensor / per group and the
  LSQ and POST weight quantizers. Methods interleaved round by round, medians. Rows marked
  ``@COMMIT`` run ``initial_codebook`` as it was at ``--reference`` (read with ``git show``), in the
  same run, so the speed-up is a same-run ratio.
* Error (``error_rows``): relative squared error ``||W - Q(W)||^2 / ||W||^2`` of ADQ codebooks as
  ``init_from`` fits them, and the bits per weight of their tables, on real weights: all-MiniLM-L6-v2's
  Linear layers, the Fashion-MNIST ResNet-20 teacher's convolutions (when cached by the B1/B2
  benchmarks), and heavy-tailed random rows (Student-t, 3 degrees of freedom), at 2/3/4 bits, per
  tensor, per channel and per group (``ERROR_OPTIONS``); per tensor and per channel also the
  reference implementation's error and this one's iterated to convergence.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, run_record, write_results  # noqa: E402

REFERENCE_COMMIT = "d791487"  # the last commit with the per-row Python loop and the scatter Lloyd iterations
QWEN_LAYER = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
              "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}
SPEED_METHODS = {  # name: (ADQConfig fields, bits)
    "adq_w4_per_channel": ({"granularity": "per_channel"}, 4),
    "adq_w4_per_tensor": ({"granularity": "per_tensor"}, 4),
    "adq_w2_per_channel": ({"granularity": "per_channel"}, 2),
    "lsq_w4_per_channel": ({"weight_quantizer": "lsq", "granularity": "per_channel"}, 4),
    "post_w4": ({"weight_quantizer": "post"}, 4),
}
REFERENCE_SPEED = ("adq_w4_per_channel", "adq_w4_per_tensor")
TIERS = {
    "quick": {"scale": 4, "rounds": 2, "error_bits": [2, 4], "minilm_layers": 6, "heavy_rows": (64, 256)},
    "standard": {"scale": 1, "rounds": 3, "error_bits": [2, 3, 4], "minilm_layers": None, "heavy_rows": (896, 4864)},
}


def reference_initial_codebook(commit: str) -> Optional[Callable]:
    """``initial_codebook`` as it was at ``commit`` (``git show``), or None without git history.
    Loaded as a module of the package (its relative imports resolve); the weight-quantizer registry
    entry it re-registers is restored."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:adq_hf/quantizers/codebook.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    from adq_hf.quantizers import WEIGHT_QUANTIZERS

    registered = dict(WEIGHT_QUANTIZERS)
    spec = importlib.util.spec_from_loader(f"adq_hf.quantizers._codebook_at_{commit}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "adq_hf.quantizers"
    exec(compile(source, f"codebook.py@{commit}", "exec"), module.__dict__)
    WEIGHT_QUANTIZERS.clear()
    WEIGHT_QUANTIZERS.update(registered)
    return module.initial_codebook


def layer_weights(scale: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(rows // scale, cols // scale, generator=generator) * 0.02
            for name, (rows, cols) in QWEN_LAYER.items()}


def speed_rows(tier: str, reference: Optional[str] = REFERENCE_COMMIT) -> Dict[str, dict]:
    """``{method: {"params_per_s", "median_s", "params"}}`` for initialising every weight of the layer."""
    from adq_hf import ADQConfig
    from adq_hf.quantizers import make_weight_quantizer

    settings = TIERS[tier]
    weights = layer_weights(settings["scale"])
    params = sum(w.numel() for w in weights.values())
    runs: Dict[str, Callable[[], None]] = {}
    for name, (fields, bits) in SPEED_METHODS.items():
        config = ADQConfig(weight_bits=bits, **fields)
        quantizers = {n: make_weight_quantizer(config, bits, w.shape) for n, w in weights.items()}
        runs[name] = lambda qs=quantizers: [qs[n].init_from(w) for n, w in weights.items()]
    old = reference_initial_codebook(reference) if reference else None
    if old is not None:
        for name in REFERENCE_SPEED:
            fields, bits = SPEED_METHODS[name]
            per_channel = fields["granularity"] == "per_channel"
            runs[f"{name}@{reference}"] = lambda b=bits, pc=per_channel: [
                old(w if pc else w.reshape(1, -1), b, "quantile", 30) for w in weights.values()]
    times = {name: [] for name in runs}
    for _ in range(settings["rounds"]):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(t), "params": params, "params_per_s": params / statistics.median(t)}
            for name, t in times.items()}


def _squared_error(rows: torch.Tensor, book: torch.Tensor) -> float:
    from adq_hf.quantizers.codebook import nearest_codes

    rows = rows.to(torch.float32)
    rounded = book.gather(1, nearest_codes(rows, book)).double()
    return float(((rounded - rows.double()) ** 2).sum())


def real_weight_sets(settings: dict) -> Dict[str, List[torch.Tensor]]:
    """Weights to measure the error on: MiniLM's Linear layers, the ResNet-20 teacher's convs (if cached)
    and heavy-tailed random rows."""
    from safetensors.torch import load_file

    from adq_hf.data import minilm_path

    sets = {}
    state = load_file(os.path.join(minilm_path(), "model.safetensors"))
    linear = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    sets["minilm_linear"] = linear[:settings["minilm_layers"]] if settings["minilm_layers"] else linear
    teacher = _cached_teacher()
    if teacher is not None:
        convs = [v for k, v in load_file(teacher).items() if v.dim() == 4 and v.shape[1] > 1]  # not the stem
        sets["resnet20_teacher_convs"] = convs
    torch.manual_seed(0)
    rows, cols = settings["heavy_rows"]
    sets["student_t3_random"] = [torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02]
    return sets


def _cached_teacher() -> Optional[str]:
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import qat_imagenet
    from common import TEACHER_CONFIG, TEACHER_OVERRIDES

    path = qat_imagenet.teacher_cache_path(qat_imagenet.load_config(TEACHER_CONFIG, TEACHER_OVERRIDES))
    return path if os.path.isfile(path) else None


ERROR_OPTIONS = {  # name: ADQConfig fields (ADQ codebooks, default initialisation)
    "per_tensor": {"granularity": "per_tensor"},
    "per_channel": {"granularity": "per_channel"},
    "per_group 128, scaled": {"granularity": "per_group", "group_size": 128},
    "per_group 64, scaled": {"granularity": "per_group", "group_size": 64},
    "per_group 128, codebooks": {"granularity": "per_group", "group_size": 128, "group_tables": "codebooks"},
}
REFERENCE_OPTIONS = ("per_tensor", "per_channel")  # the granularities the reference implementation had


def error_rows(tier: str, reference: Optional[str] = REFERENCE_COMMIT) -> List[dict]:
    """Relative squared error and table bits per weight of every option on every weight set; for the
    per-tensor/per-channel codebooks also the reference implementation's and the converged one's."""
    import warnings

    from adq_hf import ADQConfig
    from adq_hf.quantizers import make_weight_quantizer
    from adq_hf.quantizers.codebook import initial_codebook

    settings = TIERS[tier]
    old = reference_initial_codebook(reference) if reference else None
    rows = []
    for set_name, tensors in real_weight_sets(settings).items():
        energy = sum(float((w.double() ** 2).sum()) for w in tensors)
        params = sum(w.numel() for w in tensors)
        for bits in settings["error_bits"]:
            for option, fields in ERROR_OPTIONS.items():
                config = ADQConfig(weight_bits=bits, **fields)
                error = table = 0.0
                extra = {"reference": 0.0, "converged": 0.0}
                for w in tensors:
                    with warnings.catch_warnings():  # convs whose columns are not a multiple: per channel
                        warnings.simplefilter("ignore")
                        q = make_weight_quantizer(config, bits, w.shape)
                    q.init_from(w)
                    error += float(((q(w) - w).double() ** 2).sum())
                    table += q.table_bytes()
                    if option in REFERENCE_OPTIONS:
                        r = w.reshape(w.shape[0], -1) if option == "per_channel" else w.reshape(1, -1)
                        extra["converged"] += _squared_error(r, initial_codebook(r, bits, iters=1000))
                        if old is not None:
                            extra["reference"] += _squared_error(r, old(r, bits, "quantile", 30))
                row = {"weights": set_name, "option": option, "bits": bits, "params": params,
                       "error": error / energy, "table_bits_per_weight": 8 * table / params}
                if option in REFERENCE_OPTIONS:
                    row["converged"] = extra["converged"] / energy
                    if old is not None:
                        row["reference"] = extra["reference"] / energy
                rows.append(row)
    return rows


def speed_markdown(speed: Dict[str, dict], reference: Optional[str]) -> List[str]:
    lines = ["| initialisation | median (s) | M params / s |", "|---|---:|---:|"]
    lines += [f"| {n} | {r['median_s']:.3f} | {r['params_per_s'] / 1e6:.2f} |" for n, r in speed.items()]
    for name in REFERENCE_SPEED:
        old = speed.get(f"{name}@{reference}")
        if old:
            lines.append(f"\n{name}: {old['median_s'] / speed[name]['median_s']:.1f}x faster than at {reference} "
                         "(same run).")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--reference", default=REFERENCE_COMMIT, help="commit of the implementation to compare with")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    speed = speed_rows(args.tier, args.reference)
    errors = error_rows(args.tier, args.reference)
    result = {"benchmark": "B4 quantizer initialisation", "tier": args.tier, "reference": args.reference,
              "layer": {n: list(s) for n, s in QWEN_LAYER.items()}, "scale": TIERS[args.tier]["scale"],
              "speed": speed, "error": errors, **run_record("codebook_init.py", argv)}
    lines = [f"Initialisation speed, one thread, one Qwen2.5-0.5B-shaped decoder layer's Linear weights "
             f"(dimensions / {TIERS[args.tier]['scale']}), medians of {TIERS[args.tier]['rounds']} rounds:", ""]
    lines += speed_markdown(speed, args.reference)
    lines += ["", "Relative squared error ||W - Q(W)||^2 / ||W||^2 of ADQ codebooks as `init_from` fits them (default "
              "settings) and the bits per weight their tables cost (codebooks fp32, group scales fp16); per tensor and "
              f"per channel also the implementation at {args.reference} and this one iterated to convergence (up to "
              "1,000 Lloyd iterations):", "",
              "| weights | option | bits | error | table bits / weight | reference | converged |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in errors:
        ref = f"{r['reference']:.6f}" if "reference" in r else ""
        conv = f"{r['converged']:.6f}" if "converged" in r else ""
        lines.append(f"| {r['weights']} | {r['option']} | {r['bits']} | {r['error']:.6f} | "
                     f"{r['table_bits_per_weight']:.3f} | {ref} | {conv} |")
    lines += ["", f"Command: `{result['command']}` (commit {result['commit']})"]
    write_results(args.out, f"codebook_init_{args.tier}", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
