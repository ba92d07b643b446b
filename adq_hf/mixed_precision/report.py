"""The bit report: a table (layer, params, sensitivity, bits) as markdown and JSON, and a plot of
bits per layer against sensitivity, written next to a checkpoint (the model card uses them)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Union

from torch import nn

from ..surgery import bit_map
from .allocation import average_bits
from .sensitivity import weight_layers

AVERAGE_DEFINITION = ("parameter-weighted over the weights of all quantized layers (a tied weight once), first and last "
                      "layer and embeddings included at their bits; float layers, biases, norms and codebooks excluded; "
                      "see docs/mixed_precision.md")


def report_rows(model_or_bitmap: Union[nn.Module, Mapping], sensitivity: Optional[Dict[str, float]] = None,
                model: Optional[nn.Module] = None) -> List[dict]:
    """One row per quantized layer: ``layer, params, sensitivity, weight_bits, activation_bits``.

    ``model_or_bitmap``: a quantized model; ``adq_hf.bit_map(model)``; or ``{layer: bits}`` (e.g. from
    ``allocate_bits``) together with ``model=`` (the float model, for the parameter counts); its
    rows have ``activation_bits="n/a"`` (a bit map of weights says nothing about inputs).
    """
    sensitivity = dict(sensitivity or {})
    if isinstance(model_or_bitmap, nn.Module):
        entries = bit_map(model_or_bitmap)
        if not entries:
            raise ValueError("write_report: the model has no quantized layer; quantize it first, or pass "
                             "({layer: bits}, sensitivity, directory, model=float_model).")
    elif isinstance(model_or_bitmap, Mapping):
        entries = {}
        weights = weight_layers(model) if model is not None else {}
        for name, value in model_or_bitmap.items():
            if isinstance(value, Mapping):
                if "weight_bits" not in value or "params" not in value:
                    raise ValueError(f"bit map entry {name!r} needs 'weight_bits' and 'params' (as bit_map() gives).")
                entries[name] = {"weight_bits": value["weight_bits"], "activation_bits": value.get("activation_bits"),
                                 "params": value["params"]}
            else:
                if name not in weights:
                    raise ValueError(f"write_report: {name!r} has bits but no parameter count: pass model= (the model "
                                     "the bit map is for), or a bit map from adq_hf.bit_map(model).")
                entries[name] = {"weight_bits": int(value), "activation_bits": "n/a", "params": weights[name].numel()}
        if weights:  # the model's layer order
            order = {n: i for i, n in enumerate(weights)}
            entries = dict(sorted(entries.items(), key=lambda item: order.get(item[0], len(order))))
    else:
        raise ValueError(f"write_report expects a quantized model or a bit map dict, got {type(model_or_bitmap).__name__}.")
    return [
        {"layer": name, "params": int(info["params"]), "sensitivity": sensitivity.get(name),
         "weight_bits": int(info["weight_bits"]), "activation_bits": info["activation_bits"]}  # None: float
        for name, info in entries.items()
    ]


def write_report(model_or_bitmap: Union[nn.Module, Mapping], sensitivity: Optional[Dict[str, float]], directory: str,
                 model: Optional[nn.Module] = None) -> Dict[str, str]:
    """Write ``bit_report.md``, ``bit_report.json`` and ``bit_report.png`` into ``directory``; returns
    their paths ``{"md", "json", "png"}``.

    ``sensitivity=None`` on a model that ``quantize_model`` allocated uses ``model.adq_sensitivity``.
    The average is ``average_bits`` over the rows: for a quantized model, exactly
    ``adq_hf.average_weight_bits(model)``.
    """
    if sensitivity is None and isinstance(model_or_bitmap, nn.Module):
        sensitivity = getattr(model_or_bitmap, "adq_sensitivity", None)
    rows = report_rows(model_or_bitmap, sensitivity, model)
    avg = average_bits({r["layer"]: r["weight_bits"] for r in rows}, {r["layer"]: r["params"] for r in rows})
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"bit_report.{k}") for k in ("md", "json", "png")}
    with open(paths["json"], "w") as fh:
        json.dump({"average_weight_bits": avg, "average_definition": AVERAGE_DEFINITION,
                   "total_params": sum(r["params"] for r in rows), "layers": rows}, fh, indent=2)
    lines = [
        f"Average weight bits: **{avg:.3f}** ({AVERAGE_DEFINITION}).", "",
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

    sens = [r["sensitivity"] if r["sensitivity"] is not None and r["sensitivity"] > 0 else math.nan for r in rows]
    has_sens = any(not math.isnan(s) for s in sens)
    fig, axes = plt.subplots(1, 2 if has_sens else 1, figsize=(max(7, 0.35 * len(rows)) + (4 if has_sens else 0), 4.5),
                             gridspec_kw={"width_ratios": [3, 1]} if has_sens else None, squeeze=False)
    ax = axes[0][0]
    x = list(range(len(rows)))
    ax.bar(x, [r["weight_bits"] for r in rows], color="tab:blue", alpha=0.7, label="weight bits")
    ax.axhline(avg, color="tab:blue", linestyle="--", linewidth=1, label=f"average {avg:.2f}")
    ax.set_ylabel("weight bits")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=90, fontsize=7)
    if has_sens:
        twin = ax.twinx()
        twin.plot(x, sens, "o-", color="tab:red", markersize=3, label="sensitivity")
        twin.set_yscale("log")
        twin.set_ylabel("sensitivity Tr(H)/n (log)")
        twin.legend(loc="upper right", fontsize=7)
        scatter = axes[0][1]
        scatter.scatter(sens, [r["weight_bits"] for r in rows], color="tab:red", s=12)
        scatter.set_xscale("log")
        scatter.set_xlabel("sensitivity Tr(H)/n (log)")
        scatter.set_ylabel("weight bits")
        scatter.set_title("bits vs sensitivity", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("bits per layer and sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
