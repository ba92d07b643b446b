"""The bit report: a table (layer, params, sensitivity, bits) as markdown and JSON, and a plot of
bits per layer against sensitivity, written next to a checkpoint (the model card uses them)."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from torch import nn

from ..surgery import average_weight_bits, bit_map


def report_rows(model: nn.Module, sensitivity: Optional[Dict[str, float]] = None):
    sensitivity = sensitivity or {}
    return [
        {"layer": name, "params": info["params"], "sensitivity": sensitivity.get(name),
         "weight_bits": info["weight_bits"], "activation_bits": info["activation_bits"]}
        for name, info in bit_map(model).items()
    ]


def write_report(model: nn.Module, sensitivity: Optional[Dict[str, float]], directory: str) -> Dict[str, str]:
    """Write ``bit_report.md``, ``bit_report.json`` and ``bit_report.png``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    rows = report_rows(model, sensitivity if sensitivity is not None else getattr(model, "adq_sensitivity", None))
    avg = average_weight_bits(model)
    paths = {k: os.path.join(directory, f"bit_report.{k}") for k in ("md", "json", "png")}
    with open(paths["json"], "w") as fh:
        json.dump({"average_weight_bits": avg, "layers": rows}, fh, indent=2)
    lines = [
        f"Average weight bits: **{avg:.3f}** (parameter-weighted over all quantized Linear/Conv2d weights, "
        "first and last layer included; see docs/mixed_precision.md)", "",
        "| layer | params | sensitivity (Tr(H)/n) | weight bits | activation bits |", "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sens = "" if r["sensitivity"] is None else f"{r['sensitivity']:.3e}"
        act = "float" if r["activation_bits"] is None else r["activation_bits"]
        lines.append(f"| {r['layer']} | {r['params']} | {sens} | {r['weight_bits']} | {act} |")
    with open(paths["md"], "w") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(rows, avg, paths["png"])
    return paths


def _plot(rows, avg: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    x = range(len(rows))
    ax.bar(x, [r["weight_bits"] for r in rows], color="tab:blue", alpha=0.7, label="weight bits")
    ax.axhline(avg, color="tab:blue", linestyle="--", linewidth=1, label=f"average {avg:.2f}")
    ax.set_ylabel("weight bits")
    ax.set_xticks(list(x), [r["layer"] for r in rows], rotation=90, fontsize=7)
    sens = [r["sensitivity"] for r in rows]
    if any(s is not None for s in sens):
        twin = ax.twinx()
        twin.plot(list(x), [s if s is not None and s > 0 else float("nan") for s in sens], "o-", color="tab:red",
                  markersize=3, label="sensitivity")
        twin.set_yscale("log")
        twin.set_ylabel("sensitivity Tr(H)/n (log)")
        twin.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("bits per layer and sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
