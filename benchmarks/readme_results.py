#!/usr/bin/env python
"""The README's "Results" tables, generated from the committed ``benchmarks/results/*_standard.json``.

    python benchmarks/readme_results.py           # rewrite the block between the README markers
    python benchmarks/readme_results.py --check   # exit 1 when the README block is out of date

Only the block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is generated; the
commentary around it (where ADQ loses, and why we think so) is written by hand. A benchmark whose
results file is missing is left out of the block rather than shown with made-up numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, by_size_class, size_frontier, unsized_rows  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
B1_COLUMNS = [("W2A2", 2, 2), ("W2A3", 2, 3), ("W3A3", 3, 3), ("mixed 2.8, A3", 2.8, 3), ("W4A4", 4, 4),
              ("W2, A float", 2, None), ("W3, A float", 3, None)]


def load(stem: str) -> Optional[dict]:
    path = os.path.join(RESULTS, stem + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def b1(result: dict) -> List[str]:
    rows: Dict[str, dict] = result["rows"]
    stem = f"qat_accuracy_{result['tier']}"
    seeds = max(len(r.get("seeds", {"0": None})) for r in rows.values())
    fps = sorted({round(100 * r["fp_top1"], 2) for r in rows.values()})
    fp = f"{fps[0]:.2f}%" if len(fps) == 1 else f"{fps[0]:.2f}-{fps[-1]:.2f}% (the same recipe re-trained at each commit)"
    epochs = result["qat_epochs"]
    budget = (f"{epochs:g} QAT epoch{'s' if epochs != 1 else ''} with distillation per row, "
              + (f"mean over {seeds} seeds (min-max in brackets)" if seeds > 1 else "one seed"))

    def column(row: dict) -> Optional[str]:
        for title, bits, act in B1_COLUMNS:
            target = 2.8 if bits == 2.8 else bits
            mixed = len(set(row["bit_map"].values())) > 2  # more than body + 8-bit ends
            if row["activation_bits"] == act and (mixed == (bits == 2.8)) and abs(row["average_weight_bits"] - target) < 0.3:
                return title
        return None

    def cell(row: dict) -> str:
        text = f"{100 * row['top1']:.2f}"
        if len(row.get("seeds", {})) > 1:
            text += f" ({100 * row['top1_min']:.2f}-{100 * row['top1_max']:.2f})"
        return text

    methods = [m for m in dict.fromkeys(r["method"] for r in rows.values()) if "," not in m]
    table = {m: {} for m in methods}
    marked = {}  # cells whose row carries a note (e.g. measured before a method change)
    for name, row in rows.items():
        if row["method"] in table and column(row):
            table[row["method"]][column(row)] = row
            if row.get("note"):
                marked[(row["method"], column(row))] = f"{name}: {row['note']}"
    titles = [t for t, _, _ in B1_COLUMNS if any(t in cells for cells in table.values())]
    lines = [f"**B1, accuracy against bits ({result['tier']} tier)**: Fashion-MNIST ResNet-20, FP teacher top-1 {fp}, "
             f"{budget}; first conv and classifier at 8 bits, counted in the average "
             f"([results](benchmarks/results/{stem}.md), `python benchmarks/qat_accuracy.py "
             f"--tier {result['tier']}`). Top-1 (%), best of each column in bold:", "",
             f"![B1: top-1 over average weight bits](benchmarks/results/{stem}.png)", "",
             "| method | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    best = {t: max((cells[t]["top1"] for cells in table.values() if t in cells), default=None) for t in titles}
    for method, cells in table.items():
        shown = [("" if t not in cells else f"**{cell(cells[t])}**" if cells[t]["top1"] == best[t] else cell(cells[t]))
                 + (" †" if (method, t) in marked else "") for t in titles]
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    if marked:
        lines += [""] + [f"† {note}" for note in marked.values()]
    ablations = {name: r for name, r in rows.items() if "," in r["method"]}
    if ablations and "w2a2" in rows:
        full = rows["w2a2"]
        lines += ["", f"ADQ ablations at W2A2 (same budget; full ADQ W2A2 {cell(full)}%):", "",
                  "| ablation | top-1 (%) | change |", "|---|---:|---:|"]
        for name, r in ablations.items():
            lines.append(f"| {r['method'].split(', ', 1)[1]} | {cell(r)} | {100 * (r['top1'] - full['top1']):+.2f} |")
    by_commit: Dict[str, List[str]] = {}
    for name, r in rows.items():
        commits = {s.get("commit") for s in r["seeds"].values()} if "seeds" in r else {r.get("commit")}
        for c in sorted(c or result["commit"] for c in commits):
            by_commit.setdefault(c, []).append(name)
    lines += ["", "Rows by the commit that produced them: " + "; ".join(
        f"{c}: {', '.join(names)}" for c, names in by_commit.items()) + "."]
    return lines


def b4(result: dict) -> List[str]:
    mp = result["mixed_precision_s"]
    source = ("[results](benchmarks/results/step_time_standard.md), `python benchmarks/step_time.py"
              + (" --compile`" if result.get("compiled") else "`"))
    if "models" not in result:  # written before the ResNet-18 and compile rows
        result = {**result, "models": {"resnet20": {**result, "model": "resnet20_cifar", "input": [1, 28, 28]}}}
    lines = [f"**B4, training cost**: QAT step over FP step of the same model, same run, medians "
             f"({result['machine']['threads']} thread(s); {source}):", ""]
    for m in result["models"].values():
        cpu = "cpu_ratio_to_fp" in m
        lines += [f"{m['model']} {'x'.join(map(str, m['input']))}, batch {m['batch']}:", "",
                  "| method | step time / FP |" + (" by CPU time |" if cpu else "") + " quantizer parameters (% of FP) |",
                  "|---|---:|" + ("---:|" if cpu else "") + "---:|"]
        for name, r in m["ratio_to_fp"].items():
            if name != "fp":
                params = m["quantizer_params"][name]
                lines.append(f"| {name} | {r:.2f}x |" + (f" {m['cpu_ratio_to_fp'][name]:.2f}x |" if cpu else "")
                             + f" {params:,} ({100 * params / m['fp_params']:.2f}%) |")
        lines.append("")
    compiled = result.get("compiled")
    if compiled:
        lines += [f"torch.compile (inductor), {compiled['model']} batch {compiled['batch']}:", "",
                  "| method | compile time (s) | step / compiled FP | step / eager FP |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {compiled['compile_s'][n]:.0f} | {compiled['ratio_to_compiled_fp'][n]:.2f}x | "
                  f"{compiled['ratio_to_eager_fp'][n]:.2f}x |" for n in compiled["compile_s"]]
        lines.append("")
    sens = result.get("sensitivity")
    if sens is None:  # results from before the Gauss-Newton estimator
        lines += [f"Mixed-precision planning for 2.8 bits on one batch: Hutchinson sensitivity {mp['sensitivity']:.1f} s, "
                  f"MILP allocation {mp['allocation']:.2f} s."]
        return lines
    seconds, rho, differ = sens["seconds"], sens["spearman"], sens["allocation_layers_differing"]
    lines += [f"Mixed-precision planning for 2.8 bits on one batch of {sens['batch']} ({sens['model']}): Gauss-Newton "
              f"sensitivity {seconds['ggn']:.1f} s against Hutchinson's {seconds['hutchinson']:.1f} s "
              f"({sens['time_ratio_hutchinson_to_ggn']:.0f}x); Spearman rank correlation with the exact per-layer trace "
              f"{rho['ggn~exact']:.3f} (Hutchinson {rho['hutchinson~exact']:.3f}), with Hutchinson {rho['ggn~hutchinson']:.3f}; "
              f"the 2.8-bit allocation differs from the exact trace's in {differ['ggn~exact']} of {sens['layers']} layers "
              f"(Hutchinson's in {differ['hutchinson~exact']}); MILP allocation {mp['allocation']:.2f} s."]
    return lines


def b5(result: dict) -> List[str]:
    rows = result["rows"]
    lines = ["**B5, transformers**: all-MiniLM-L6-v2 weights only, adq_hf through `AutoModel.from_pretrained(..., "
             "quantization_config=ADQConfig(...))` and weight-only peers on the same Linear layers in the same run; "
             "mean-pooled embedding cosine to FP on held-out real sentences "
             "([results](benchmarks/results/transformers_fidelity_standard.md), "
             "`python benchmarks/transformers_fidelity.py --tier standard`). Rows grouped by size class: stored bits "
             "per weight of the quantized layers, codes + scales, zeros and tables at their stored dtype "
             "([docs/format.md](docs/format.md#bits-per-weight)); best cosine of each class in bold; frontier: no "
             "other row is as small or smaller and as close or closer to FP:", "",
             "| size class | row | how | stored bits / weight | cosine to FP (mean) | min | frontier | checkpoint / FP checkpoint |",
             "|---|---|---|---:|---:|---:|:-:|---:|"]
    fp_bytes, frontier = rows["fp"]["checkpoint_bytes"], size_frontier(rows)
    for cls, names, best in by_size_class(rows):
        for name in names:
            r = rows[name]
            cosine = f"**{r['cosine']:.4f}**" if name == best else f"{r['cosine']:.4f}"
            lines.append(f"| {cls} | {name} | {r['how']} | {r['bits_per_weight']:.2f} | {cosine} | "
                         f"{r['cosine_min']:.4f} | {'yes' if name in frontier else ''} | {r['checkpoint_bytes'] / fp_bytes:.2f} |")
    earlier = unsized_rows(rows)
    if earlier:
        lines += ["", "Measured by an earlier run, before stored bits per weight were recorded (nominal bits):", "",
                  "| row | how | nominal bits | cosine to FP (mean) | min | checkpoint / FP checkpoint | commit |",
                  "|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {n} | {rows[n]['how']} | {rows[n]['avg_weight_bits']:.2f} | {rows[n]['cosine']:.4f} | "
                  f"{rows[n]['cosine_min']:.4f} | {rows[n]['checkpoint_bytes'] / fp_bytes:.2f} | {rows[n]['commit']} |"
                  for n in earlier]
    return lines


def block() -> str:
    parts = []
    for stem, render in (("qat_accuracy_standard", b1), ("qat_accuracy_epoch1", b1), ("step_time_standard", b4),
                         ("transformers_fidelity_standard", b5)):
        result = load(stem)
        if result is not None:
            parts.append("\n".join(render(result)) + f"\n\n(commit {result['commit']}, {result['time']})")
    return BEGIN + "\n" + "\n\n".join(parts) + "\n" + END


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the README block is current")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = parser.parse_args(argv)
    with open(args.readme) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        print(f"{args.readme} has no {BEGIN} ... {END} block: add the two markers where the tables go", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    new = head + block() + rest.split(END, 1)[1]
    if args.check:
        if new != text:
            print("README results are out of date: run python benchmarks/readme_results.py", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w") as fh:
        fh.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
