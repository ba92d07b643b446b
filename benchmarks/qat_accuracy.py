"""B1: Fashion-MNIST ResNet-20 accuracy against bits, every method and row under one budget.

    python benchmarks/qat_accuracy.py --tier standard --teacher-only       # train/check the FP teacher first
    python benchmarks/qat_accuracy.py --tier standard [--rows w2a2 lsq_w2a2 ...] [--seeds 0 1 2] [--epochs 4]

Each (row, seed) runs ``recipes/qat_imagenet.py`` with a ``recipes/configs/fmnist_resnet20_*.yaml``
plus the tier's overrides (QAT epochs, seed) and the tier's FP teacher, trained once per tier
(seed 0, cached; ``--teacher-only`` trains it and prints its top-1) and passed to every row and seed
as ``teacher.checkpoint``, so seeds change only the student's data order and augmentation. Other
methods and the ADQ ablations are the ADQ config of the same bits with the method's quantizers (or
the ablated component) overridden, so only that differs; peer libraries (brevitas, coremltools'
DKM) run through the recipe's peer backends and are skipped when the library is missing.

Tiers: ``quick`` (CI: a few hundred images), ``epoch1`` (the earlier standard: a 2-epoch teacher,
1 QAT epoch, one seed; its committed table stays in the README) and ``standard`` (a teacher trained
to convergence, 4 QAT epochs per row, 3 seeds: hours of CPU, see ``--rows``/``--seeds`` below).

Resumable: a (row, seed) finished in the work directory (``<work-dir>/<tier>/<row>/seed<N>/``) is
reused, so the standard tier can be run in parts (``--rows``, ``--seeds``; two invocations with
different rows can run at the same time once the teacher exists); rows not asked for are kept from
the results file, each seed with the commit that produced it. A cell's top-1 is the mean over its
seeds, with the min-max. Results: ``benchmarks/results/qat_accuracy_<tier>.{json,md,png}`` (the plot:
mean top-1 over average weight bits with the min-max, one line per method).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, run_record, write_results  # noqa: E402

LSQ = ["quantization.weight_quantizer=lsq", "quantization.activation_quantizer=lsq"]
ASQ_POST = ["quantization.weight_quantizer=post", "quantization.activation_quantizer=asq"]


@dataclass(frozen=True)
class Row:
    method: str  # one line per method in the plot
    config: str  # ADQ config of these bits (recipes/configs/fmnist_resnet20_<config>.yaml)
    overrides: Tuple[str, ...] = field(default=())
    needs: Optional[str] = None  # the peer library the row runs (skipped when it is not installed)


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
    "brevitas_w2a2": Row("brevitas", "brevitas_w2a2", needs="brevitas"),
    "brevitas_w3a3": Row("brevitas", "brevitas_w3a3", needs="brevitas"),
    "brevitas_w4a4": Row("brevitas", "brevitas_w4a4", needs="brevitas"),
    "brevitas_mixed2.8": Row("brevitas", "brevitas_mixed2.8", needs="brevitas"),
    # weight-only (activations float), where a learned codebook meets a uniform grid and the codebook peer
    "w2": Row("ADQ", "w2"),
    "w3": Row("ADQ", "w3"),
    "lsq_w2": Row("LSQ", "w2", ("quantization.weight_quantizer=lsq",)),
    "lsq_w3": Row("LSQ", "w3", ("quantization.weight_quantizer=lsq",)),
    "dkm_w2": Row("coremltools DKM", "dkm_w2", needs="coremltools"),
    "dkm_w3": Row("coremltools DKM", "dkm_w3", needs="coremltools"),
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


@dataclass(frozen=True)
class Tier:
    overrides: Tuple[str, ...]  # shared by every row (the teacher's settings included)
    rows: Tuple[str, ...]  # run when --rows is not given
    epochs: float  # QAT epochs per row
    seeds: Tuple[int, ...]


WEIGHT_ONLY_CONFIGS = ("w2", "w3", "dkm_w2", "dkm_w3")
EPOCH1_ROWS = tuple(name for name, row in ROWS.items() if row.config not in WEIGHT_ONLY_CONFIGS)
TIERS = {
    "quick": Tier(("teacher.epochs=1", "data.train_limit=512", "data.eval_limit=256", "data.batch_size=32",
                   "optim.warmup_steps=2", "calibration.num_batches=1"),
                  ("w2a2", "mixed2.8", "lsq_w2a2", "asq_post_w2a2", "w2a2_no_kd", "w2", "dkm_w2"), 1, (0,)),
    # the standard tier before issue 18 (README's 1-epoch table): a 2-epoch teacher (90.28%), 1 QAT epoch
    "epoch1": Tier(("teacher.epochs=2", "optim.warmup_steps=30"), EPOCH1_ROWS, 1, (0,)),
    # a teacher trained to convergence (>= 92% expected), 4 QAT epochs per row, 3 seeds per cell
    "standard": Tier(("teacher.epochs=6", "optim.warmup_steps=30"), tuple(ROWS), 4, (0, 1, 2)),
}
ROW_RECORD = "benchmark_row.json"  # commit and time of the invocation that ran the (row, seed)


def available(row: Row) -> bool:
    return row.needs is None or importlib.util.find_spec(row.needs) is not None


def recipe_command(config: str, out: str, overrides: List[str]) -> List[str]:
    return [sys.executable, os.path.join(ROOT, "recipes", "qat_imagenet.py"), "--config",
            os.path.join(ROOT, "recipes", "configs", f"fmnist_resnet20_{config}.yaml"), "--output-dir", out,
            "--set", *overrides]


def tier_teacher(tier: Tier, cache_dir: Optional[str], work: str) -> Tuple[str, float]:
    """The tier's FP teacher (path, top-1): trained once by the recipe (seed 0, its own settings, with
    ``optim.max_steps=1`` so that no real QAT runs) and cached, like every recipe run caches it."""
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import qat_imagenet

    overrides = list(tier.overrides) + ([f"cache_dir={cache_dir}"] if cache_dir else [])
    config = os.path.join(ROOT, "recipes", "configs", "fmnist_resnet20_w2a2.yaml")
    path = qat_imagenet.teacher_cache_path(qat_imagenet.load_config(config, overrides))
    out = os.path.join(work, "teacher")
    done = os.path.join(out, "results.json")
    if not os.path.isfile(path) or not os.path.isfile(done):
        proc = subprocess.run(recipe_command("w2a2", out, overrides + ["optim.max_steps=1"]),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the FP teacher failed:\n{proc.stderr[-3000:]}")
    with open(done) as fh:
        return path, json.load(fh)["fp_top1"]


def run_row(name: str, row: Row, overrides: List[str], out: str, record: dict) -> dict:
    """One (row, seed)'s recipe results; runs the recipe unless an earlier invocation finished it.
    The commit that ran it is written beside them, so later invocations credit the right commit."""
    done = os.path.join(out, "results.json")
    if not os.path.isfile(done):
        started = time.time()
        proc = subprocess.run(recipe_command(row.config, out, overrides + list(row.overrides)),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"row {name} failed:\n{proc.stderr[-3000:]}")
        print(f"{name} ({os.path.basename(out)}): {time.time() - started:.0f} s", flush=True)
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


def seed_summary(result: dict, record: dict) -> dict:
    keys = ("fp_top1", "top1", "top5", "epoch_time_s")
    return {**{k: result[k] for k in keys}, "commit": record["commit"], "time": record["time"]}


def summarise(row: Row, results: Dict[int, dict], seeds: Dict[int, dict]) -> dict:
    """A row over its seeds: per-seed results, the mean and min-max of top-1, and the (seed-independent)
    bits of any one run."""
    any_result = next(iter(results.values()))
    top1 = [s["top1"] for s in seeds.values()]
    return {"method": row.method, "overrides": list(row.overrides),
            "average_weight_bits": any_result["average_weight_bits"],
            "activation_bits": any_result["quantization_config"].get("activation_bits"),
            "bit_map": {n: b["weight_bits"] for n, b in any_result["bit_map"].items()},
            "top1": statistics.mean(top1), "top1_min": min(top1), "top1_max": max(top1),
            "fp_top1": statistics.mean(s["fp_top1"] for s in seeds.values()),
            "seeds": {str(k): v for k, v in sorted(seeds.items())}}


def seeds_of(row: dict) -> Dict[str, dict]:
    """A results row's per-seed entries; rows written before seeds existed are one seed, 0."""
    if "seeds" in row:
        return row["seeds"]
    return {"0": {k: row.get(k) for k in ("fp_top1", "top1", "top5", "epoch_time_s", "commit", "time")}}


def committed_rows(path: str) -> dict:
    """Rows of the results file already written for this tier: a clean clone (no ``outputs/``)
    keeps them, so finishing one more row never drops the others. Rows written before rows carried
    their own commit get the file's."""
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        old = json.load(fh)
    rows = {}
    for name, row in old["rows"].items():
        seeds = {k: {**v, "commit": v.get("commit") or old.get("commit"), "time": v.get("time") or old.get("time")}
                 for k, v in seeds_of(row).items()}
        rows[name] = {**row, "seeds": seeds}
    return rows


def plot(rows: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = sorted({r["method"] for r in rows.values()}, key=lambda m: (m != "ADQ", m))
    for method in methods:
        points = sorted((r["average_weight_bits"], name) for name, r in rows.items() if r["method"] == method)
        xs = [p[0] for p in points]
        mean = [100 * rows[n]["top1"] for _, n in points]
        low = [100 * (rows[n]["top1"] - rows[n].get("top1_min", rows[n]["top1"])) for _, n in points]
        high = [100 * (rows[n].get("top1_max", rows[n]["top1"]) - rows[n]["top1"]) for _, n in points]
        ax.errorbar(xs, mean, yerr=[low, high], fmt="-o" if len(points) > 1 else "s", capsize=2, label=method)
        for (x, name), y in zip(points, mean):
            act = rows[name]["activation_bits"]
            ax.annotate(f"A{act}" if act else "A32", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    fp = statistics.mean(r["fp_top1"] for r in rows.values())
    ax.axhline(100 * fp, color="grey", ls="--", lw=1, label=f"FP {100 * fp:.2f}%")
    ax.set_xlabel("average weight bits (parameter-weighted, first/last layer 8-bit included)")
    ax.set_ylabel("top-1 (%), mean and min-max over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: the tier's rows")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the tier's seeds")
    parser.add_argument("--epochs", type=float, default=None, help="QAT epochs for every row (default: the tier's)")
    parser.add_argument("--teacher-only", action="store_true", help="train (or find) the tier's FP teacher and stop")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "outputs", "benchmarks"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cache-dir", default=None, help="teacher cache (default ~/.cache/adq_hf)")
    args = parser.parse_args(argv)
    tier = TIERS[args.tier]
    epochs = tier.epochs if args.epochs is None else args.epochs
    seeds = list(tier.seeds if args.seeds is None else args.seeds)
    work = os.path.join(args.work_dir, args.tier)
    try:
        teacher, teacher_top1 = tier_teacher(tier, args.cache_dir, work)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"FP teacher: top-1 {100 * teacher_top1:.2f}% ({teacher})", flush=True)
    if args.teacher_only:
        return 0
    overrides = list(tier.overrides) + [f"optim.epochs={epochs}", f"teacher.checkpoint={teacher}"]
    stem = f"qat_accuracy_{args.tier}"
    record = run_record("qat_accuracy.py", argv)
    earlier = committed_rows(os.path.join(args.out, stem + ".json"))

    def credit(name: str, seed: int) -> dict:  # who ran a (row, seed) finished before the record files existed
        old = earlier.get(name, {}).get("seeds", {}).get(str(seed))
        return {k: old.get(k) for k in ("commit", "time")} if old else record

    rows = {}
    for name in ROWS:
        row = ROWS[name]
        asked = name in (args.rows or tier.rows)
        if asked and not available(row):
            print(f"{name}: skipped ({row.needs} is not installed: pip install -c constraints.txt -e '.[bench]')")
        results, per_seed = {}, {}
        for seed in sorted(set(seeds) | {int(k) for k in earlier.get(name, {}).get("seeds", {})}):
            out = os.path.join(work, name, f"seed{seed}")
            try:
                if asked and seed in seeds and available(row):
                    results[seed] = run_row(name, row, overrides + [f"seed={seed}"], out, record)
                elif os.path.isfile(os.path.join(out, "results.json")):  # finished by an earlier invocation
                    with open(os.path.join(out, "results.json")) as fh:
                        results[seed] = json.load(fh)
            except RuntimeError as err:
                print(err, file=sys.stderr)
                return 1
            if seed in results:
                per_seed[seed] = seed_summary(results[seed], row_record(out, credit(name, seed)))
            elif str(seed) in earlier.get(name, {}).get("seeds", {}):
                per_seed[seed] = earlier[name]["seeds"][str(seed)]
        if results:
            rows[name] = summarise(row, results, per_seed)
        elif name in earlier:
            rows[name] = {**earlier[name], "seeds": {str(k): v for k, v in sorted(per_seed.items())}}
    result = {"benchmark": "B1 accuracy vs bits (Fashion-MNIST, ResNet-20)", "tier": args.tier,
              "qat_epochs": epochs, "seeds": seeds, "shared_overrides": overrides[:-1],
              "teacher_top1": teacher_top1, "rows": rows, **record}
    lines = [f"Command: `{result['command']}` (commit {result['commit']}); FP teacher {100 * teacher_top1:.2f}%, "
             f"{epochs:g} QAT epochs per row", "",
             "| row | method | avg weight bits | activation bits | top-1 (mean) | min-max | seeds | FP top-1 | gap | "
             "QAT epoch time (s) | commits |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in rows.items():
        runs = v["seeds"].values()
        times = [t for s in runs for t in (s.get("epoch_time_s") or [])]
        commits = sorted({s.get("commit") or "" for s in runs})
        lines.append(f"| {name} | {v['method']} | {v['average_weight_bits']:.2f} | {v['activation_bits'] or 'float'} | "
                     f"{100 * v['top1']:.2f} | {100 * v.get('top1_min', v['top1']):.2f}-"
                     f"{100 * v.get('top1_max', v['top1']):.2f} | {len(v['seeds'])} | {100 * v['fp_top1']:.2f} | "
                     f"{100 * (v['top1'] - v['fp_top1']):+.2f} | {statistics.median(times) if times else 0:.0f} | "
                     f"{', '.join(commits)} |")
    notes = [f"- {name}: {v['note']}" for name, v in rows.items() if v.get("note")]
    lines += [""] + notes if notes else []
    path = write_results(args.out, stem, result, lines)
    plot(rows, path + ".png", f"Fashion-MNIST ResNet-20, {epochs:g} QAT epoch(s) per point, {len(seeds)} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
