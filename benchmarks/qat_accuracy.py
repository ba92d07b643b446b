#!/usr/bin/env python
"""B1: Fashion-MNIST ResNet-20 accuracy against bits, every method and row under one budget.

    python benchmarks/qat_accuracy.py --tier standard [--rows w2a2 lsq_w2a2 ...] [--epochs 1]

Each row runs ``recipes/qat_imagenet.py`` with a ``recipes/configs/fmnist_resnet20_*.yaml`` plus
the tier's overrides (teacher epochs, QAT epochs, seed), so every row shares one cached FP teacher
and one training budget. Other methods and the ADQ ablations are the ADQ config of the same bits
with the method's quantizers (or the ablated component) overridden, so only that differs. A row
finished in the work directory is reused (resumable row by row); rows not asked for are kept from
the results file, each with the commit that produced it. Results: ``benchmarks/results/
qat_accuracy_<tier>.{json,md,png}`` (the plot: top-1 over average weight bits, one line per method).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, run_record, write_results  # noqa: E402

LSQ = ["quantization.weight_quantizer=lsq", "quantization.activation_quantizer=lsq"]
ASQ_POST = ["quantization.weight_quantizer=post", "quantization.activation_quantizer=asq"]


@dataclass(frozen=True)
class Row:
    method: str  # one line per method in the plot
    config: str  # ADQ config of these bits (recipes/configs/fmnist_resnet20_<config>.yaml)
    overrides: Tuple[str, ...] = field(default=())


ROWS = {
    "w2a2": Row("ADQ", "w2a2"),
    "w2a3": Row("ADQ", "w2a3"),
    "w3a3": Row("ADQ", "w3a3"),
    "mixed2.8": Row("ADQ", "mixed2.8"),
    "w4a4": Row("ADQ", "w4a4"),
    "lsq_w2a2": Row("LSQ", "w2a2", tuple(LSQ)),
    "lsq_w3a3": Row("LSQ", "w3a3", tuple(LSQ)),
    "lsq_mixed2.8": Row("LSQ", "mixed2.8", tuple(LSQ)),
    "lsq_w4a4": Row("LSQ", "w4a4", tuple(LSQ)),
    "asq_post_w2a2": Row("ASQ+POST", "w2a2", tuple(ASQ_POST)),
    "asq_post_w3a3": Row("ASQ+POST", "w3a3", tuple(ASQ_POST)),
    "asq_post_mixed2.8": Row("ASQ+POST", "mixed2.8", tuple(ASQ_POST)),
    "asq_post_w4a4": Row("ASQ+POST", "w4a4", tuple(ASQ_POST)),
    # the peer library (optional `bench` extra), uniform per-channel weights, learned activation scales
    "brevitas_w2a2": Row("brevitas", "brevitas_w2a2"),
    "brevitas_w3a3": Row("brevitas", "brevitas_w3a3"),
    "brevitas_w4a4": Row("brevitas", "brevitas_w4a4"),
    "brevitas_mixed2.8": Row("brevitas", "brevitas_mixed2.8"),
    # ADQ ablations at W2A2, where the codebook has the fewest levels (uniform instead of mixed bits:
    # compare mixed2.8 with w2a3 and w3a3, which use the same activation bits). Quantile against
    # uniform initialisation is measured on the raw initial levels (no Lloyd refinement, which
    # would carry either to nearly the same levels): compare w2a2_uniform_init with w2a2_raw_quantile_init.
    "w2a2_raw_quantile_init": Row("ADQ, no init refinement", "w2a2", ("quantization.codebook_init_iters=0",)),
    "w2a2_uniform_init": Row("ADQ, uniform init (no refinement)", "w2a2",
                             ("quantization.codebook_init=uniform", "quantization.codebook_init_iters=0")),
    "w2a2_static_codebook": Row("ADQ, static codebook", "w2a2", ("quantization.codebook_update=static",)),
    "w2a2_no_kd": Row("ADQ, no distillation", "w2a2", ("distill.kd_weight=0.0", "distill.ce_weight=1.0")),
}
TIERS = {  # overrides shared by every row, and the rows run when --rows is not given
    "quick": (["teacher.epochs=1", "data.train_limit=512", "data.eval_limit=256", "data.batch_size=32",
               "optim.warmup_steps=2", "calibration.num_batches=1"],
              ["w2a2", "mixed2.8", "lsq_w2a2", "asq_post_w2a2", "w2a2_no_kd"]),
    "standard": (["teacher.epochs=2", "optim.warmup_steps=30"], list(ROWS)),
}


ROW_RECORD = "benchmark_row.json"  # commit and time of the invocation that ran the row


def run_row(name: str, row: Row, overrides: List[str], out: str, record: dict) -> dict:
    """The row's recipe results; runs the recipe unless an earlier invocation finished it. The
    commit that ran it is written beside them, so later invocations credit the right commit."""
    done = os.path.join(out, "results.json")
    if not os.path.isfile(done):
        config = os.path.join(ROOT, "recipes", "configs", f"fmnist_resnet20_{row.config}.yaml")
        cmd = [sys.executable, os.path.join(ROOT, "recipes", "qat_imagenet.py"), "--config", config,
               "--output-dir", out, "--set", *overrides, *row.overrides]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"row {name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
        with open(os.path.join(out, ROW_RECORD), "w") as fh:
            json.dump({"commit": record["commit"], "time": record["time"]}, fh)
    with open(done) as fh:
        return json.load(fh)


def row_record(out: str, fallback: dict) -> dict:
    path = os.path.join(out, ROW_RECORD)
    if os.path.isfile(path):
        with open(path) as fh:
            return json.load(fh)
    return fallback


def summarise(name: str, row: Row, result: dict, record: dict) -> dict:
    keys = ("fp_top1", "top1", "top5", "average_weight_bits", "epoch_time_s")
    return {"method": row.method, "overrides": list(row.overrides), **{k: result[k] for k in keys},
            "activation_bits": result["quantization_config"]["activation_bits"],
            "bit_map": {n: b["weight_bits"] for n, b in result["bit_map"].items()},
            "commit": record["commit"], "time": record["time"]}


def committed_rows(path: str) -> dict:
    """Rows of the results file already written for this tier: a clean clone (no ``outputs/``)
    keeps them, so finishing one more row never drops the others. Rows written before rows carried
    their own commit get the file's."""
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        old = json.load(fh)
    return {name: {"commit": old.get("commit"), "time": old.get("time"), **row} for name, row in old["rows"].items()}


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = sorted({r["method"] for r in rows.values()}, key=lambda m: (m != "ADQ", m))
    for method in methods:
        points = sorted((r["average_weight_bits"], 100 * r["top1"], name) for name, r in rows.items()
                        if r["method"] == method)
        style = "-o" if len(points) > 1 else "s"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=method)
        for x, y, name in points:
            ax.annotate(f"A{rows[name]['activation_bits']}", (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    fp = next(iter(rows.values()))["fp_top1"]
    ax.axhline(100 * fp, color="grey", ls="--", lw=1, label=f"FP {100 * fp:.2f}%")
    ax.set_xlabel("average weight bits (parameter-weighted, first/last layer 8-bit included)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST ResNet-20, same QAT budget per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: the tier's rows")
    parser.add_argument("--epochs", type=float, default=1.0, help="QAT epochs for every row")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "outputs", "benchmarks"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache-dir", default=None, help="teacher cache (default ~/.cache/adq_hf)")
    args = parser.parse_args(argv)
    shared, default_rows = TIERS[args.tier]
    overrides = shared + [f"optim.epochs={args.epochs}"] + ([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
    stem = f"qat_accuracy_{args.tier}"
    work = os.path.join(args.work_dir, args.tier)
    record = run_record("qat_accuracy.py", argv)
    earlier = committed_rows(os.path.join(args.out, stem + ".json"))

    def credit(name: str) -> dict:  # who ran a row finished before the record files existed
        return {k: earlier[name].get(k) for k in ("commit", "time")} if name in earlier else record

    rows = {}
    for name in args.rows or default_rows:
        try:
            out = os.path.join(work, name)
            result = run_row(name, ROWS[name], overrides, out, record)
            rows[name] = summarise(name, ROWS[name], result, row_record(out, credit(name)))
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
    for name, row in ROWS.items():  # rows finished by earlier invocations (other --rows) stay in the results
        done = os.path.join(work, name, "results.json")
        if name not in rows and os.path.isfile(done):
            with open(done) as fh:
                rows[name] = summarise(name, row, json.load(fh), row_record(os.path.join(work, name), credit(name)))
        elif name not in rows and name in earlier:
            rows[name] = earlier[name]
    rows = {name: rows[name] for name in ROWS if name in rows}  # a stable order
    result = {"benchmark": "B1 accuracy vs bits (Fashion-MNIST, ResNet-20)", "tier": args.tier,
              "qat_epochs": args.epochs, "shared_overrides": overrides, "rows": rows, **record}
    lines = [f"Command: `{result['command']}` (commit {result['commit']})", "",
             "| row | method | avg weight bits | activation bits | top-1 | FP top-1 | gap | QAT epoch time (s) | commit |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in rows.items():
        lines.append(f"| {name} | {v['method']} | {v['average_weight_bits']:.2f} | {v['activation_bits']} | "
                     f"{100 * v['top1']:.2f} | {100 * v['fp_top1']:.2f} | {100 * (v['top1'] - v['fp_top1']):+.2f} | "
                     f"{', '.join(f'{t:.0f}' for t in v['epoch_time_s'])} | {v.get('commit') or ''} |")
    notes = [f"- {name}: {v['note']}" for name, v in rows.items() if v.get("note")]
    lines += [""] + notes if notes else []
    path = write_results(args.out, stem, result, lines)
    plot(rows, path + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
