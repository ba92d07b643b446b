#!/usr/bin/env python
"""B5: all-MiniLM-L6-v2 quantized through transformers: sentence-embedding fidelity, bits, checkpoint size.

    python benchmarks/transformers_fidelity.py --tier standard [--rows w4 w3 ...] [--restart] [--threads N]
    python benchmarks/transformers_fidelity.py --model mpnet ...   # all-mpnet-base-v2 (adq_hf.data.mpnet_path)

Every quantized row is loaded with ``AutoModel.from_pretrained(path, quantization_config=ADQConfig(...))``
(weights only: per-output-channel ADQ codebooks, activations float), so ``model.save_pretrained``
packs it through adq_hf's transformers quantizer. Rows:

* ``w4``, ``w3``, ``w2``: the codebooks as ``from_pretrained`` initialises them (weight quantiles, no data).
* ``w4_emb4``, ``w4_emb8``: ``w4`` with the word/position/type embeddings quantized too
  (``embedding_bits``; per-channel: one codebook per token row).
* ``mixed3.5``: ``from_pretrained`` gets no calibration data (``target_avg_bits`` alone raises there),
  so the bits are allocated first on the FP model (``plan_mixed_precision``: sensitivity on
  calibration sentences, then the exact allocation) and passed to ``from_pretrained`` as ``layer_bits``.
* ``ptq_gptq_w3``, ``ptq_sa_w3``: the W3 model, then ``adq_hf.ptq.quantize`` on the calibration sentences.
* ``qat_w3``: the W3 model, then a short self-distillation (Adam on ``1 - cos`` between its and the
  FP model's mean-pooled embeddings of the calibration sentences); fidelity before and after.
* Peers (benchmarks/weight_only_peers.py), on the same Linear layers adq_hf quantizes: ``rtn*``
  (uniform grid per channel), ``gptq*`` (adq_hf's GPTQ solver onto a uniform grid per channel or per
  group of 128/64 columns, on the calibration sentences), ``hqq_g64_*`` / ``hqq_g128_*`` (the ``hqq``
  library, groups along the input columns; ``*_axis0``: HQQ's ``axis=0``, groups within an input column), ``nf4``, ``nf4_dq``, ``fp4`` (bitsandbytes, CPU). Each at W4/W3/W2 where the method has it.
* ``g*`` / ``ptq_*_g*`` / ``mixed*_g*`` (issue 19's codebook options): ``granularity="per_group"``
  (one codebook per tensor times an fp16 scale per group of 64/128 input columns), then, as the row
  says, ``adq_hf.fit_codebooks`` (Hessian-weighted tables from the calibration sentences) and
  ``ptq.quantize`` (group scales re-fitted from the compensated weights); ``mixed*``: bits allocated on
  the FP model under a byte budget that counts the tables (``allocate_bits(max_bytes=budget * params /
  8)``, the tier's sensitivity), then the same. Their ``how`` gives the bits per weight with the tables
  (``memory_report``'s ``bits_per_weight``).

Fidelity: cosine similarity of mean-pooled embeddings to the FP model's, mean and min over held-out
sentences (Debian fortunes-min: calibration/training sentences from the start of the list, evaluation
sentences from index 256 on, so the sets are disjoint). Size: stored bits per weight of the
quantized layers (codes + scales, zeros, tables at their stored dtype: docs/format.md, "Bits per
weight"), and the bytes of the whole ``*.safetensors`` checkpoint against the FP model's: adq_hf rows
``save_pretrained`` and are loaded back (fidelity measured again); a peer's checkpoint is the model's
float tensors plus the peer's own stored tensors per layer (no loader: not reloaded). Rows are
grouped by size class (stored bits per weight <= 2.25, <= 3.25, <= 4.25, above), best of each marked. Finished rows are stored in the JSON as they finish and reused by a
rerun of the same tier and settings (``--restart`` runs them again).
Results: benchmarks/results/transformers_fidelity_<tier>.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, by_size_class, commit, mean_pooled, run_record, sentence_batches,  # noqa: E402
                    sentence_embeddings, size_frontier, unsized_rows, write_results)
from weight_only_peers import PEERS, adq_checkpoint_storage, bits_per_weight, quantize_linears, state_with_storage  # noqa: E402

MODELS = {"minilm": ("all-MiniLM-L6-v2", "minilm_path"), "mpnet": ("all-mpnet-base-v2", "mpnet_path")}
EVAL_OFFSET = 256  # fortunes-min has 386 usable sentences: calibration/training from 0, evaluation from here
MB = 1e6


@dataclass(frozen=True)
class Row:
    kind: str  # the builder below: "fp", "load", "mixed", "ptq", "qat" or "peer"
    bits: Optional[float] = None  # weight bits; for "mixed" the average-bit budget
    method: str = ""  # PTQ solver; for "mixed": "residual" = sensitivity of 0.5 * mean(y**2) instead of Gauss-Newton;
    # for "peer": the name in weight_only_peers.PEERS
    group_size: Optional[int] = None  # "grouped"/"grouped_mixed": ADQ per_group tables of this many columns
    weighting: Optional[str] = None  # "grouped"/"grouped_mixed": fit_codebooks(method=...) before any PTQ
    embedding_bits: Optional[int] = None  # "load": the embeddings' bits (None: float)


ROWS = {
    "fp": Row("fp"),
    "w4": Row("load", 4),
    "w4_emb4": Row("load", 4, embedding_bits=4),
    "w4_emb8": Row("load", 4, embedding_bits=8),
    "w3": Row("load", 3),
    "w2": Row("load", 2),
    "mixed3.5": Row("mixed", 3.5),
    "mixed3.5_residual_proxy": Row("mixed", 3.5, "residual"),  # the label-free loss used before (docs/mixed_precision.md)
    "ptq_gptq_w3": Row("ptq", 3, "gptq"),
    "ptq_sa_w3": Row("ptq", 3, "sa"),
    "qat_w3": Row("qat", 3),
    **{f"{peer}_w{b}": Row("peer", b, peer) for peer in ("rtn", "rtn_sym", "gptq", "gptq_g128", "gptq_g64",
                                                          "hqq_g64", "hqq_g128", "hqq_g64_axis0", "hqq_g128_axis0")
       for b in (4, 3, 2)},
    **{peer: Row("peer", 4, peer) for peer in ("nf4", "nf4_dq", "fp4")},  # bitsandbytes: 4-bit formats only
    # issue 19: group scales of a shared codebook, Hessian-weighted fits, PTQ onto them, mixed precision
    "g128_w4": Row("grouped", 4, "", 128),
    "g128_w3": Row("grouped", 3, "", 128),
    "g128_w3_hessian": Row("grouped", 3, "", 128, "hessian"),
    "ptq_gptq_g128_w4": Row("grouped", 4, "gptq", 128, "hessian"),
    "ptq_gptq_g128_w3": Row("grouped", 3, "gptq", 128, "hessian"),
    "ptq_gptq_g64_w3": Row("grouped", 3, "gptq", 64, "hessian"),
    "ptq_gptq_g64_w2": Row("grouped", 2, "gptq", 64, "hessian"),
    "mixed3.25_ptq_gptq_g128": Row("grouped_mixed", 3.25, "gptq", 128, "hessian"),
    "mixed3.25_ptq_gptq_g64": Row("grouped_mixed", 3.25, "gptq", 64, "hessian"),
    "mixed3.25_ptq_sa_g128": Row("grouped_mixed", 3.25, "sa", 128, "hessian"),
    "mixed2.25_ptq_sa_g128": Row("grouped_mixed", 2.25, "sa", 128, "hessian"),
    "mixed3.0_ptq_gptq_g128": Row("grouped_mixed", 3.0, "gptq", 128, "hessian"),
    "mixed2.5_ptq_gptq_g64": Row("grouped_mixed", 2.5, "gptq", 64, "hessian"),
    "mixed2.25_ptq_gptq_g128": Row("grouped_mixed", 2.25, "gptq", 128, "hessian"),
}
TIERS = {
    "quick": {"calib_sentences": 16, "eval_sentences": 32, "batch_size": 16, "sensitivity": "fisher",
              "sensitivity_batches": 1, "probes": 1, "qat_steps": 5, "qat_lr": 1e-5,
              "rows": ["fp", "w4", "w3", "mixed3.5", "ptq_gptq_w3", "ptq_sa_w3", "qat_w3", "rtn_w3", "gptq_g128_w3",
                       "hqq_g64_w3", "nf4_dq", "g128_w3_hessian", "mixed2.5_ptq_gptq_g64"]},
    "standard": {"calib_sentences": 256, "eval_sentences": 128, "batch_size": 32, "sensitivity": "hutchinson",
                 "sensitivity_batches": 1, "probes": 50, "qat_steps": 200, "qat_lr": 1e-5, "rows": list(ROWS)},
}


def weight_only(**fields):
    """The benchmark's ADQConfig: float activations, one codebook per output channel."""
    from adq_hf import ADQConfig

    return ADQConfig(activation_bits=None, granularity="per_channel", **fields)


class Setup:
    """What every row shares: the FP checkpoint, the sentence batches and the FP reference embeddings."""

    def __init__(self, tier: dict, model: str = "minilm"):
        from transformers import AutoTokenizer

        from adq_hf import data
        from adq_hf.surgery import plan_quantization

        self.tier = tier
        self.path = getattr(data, MODELS[model][1])()
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        size = tier["batch_size"]
        self.calibration = sentence_batches(tokenizer, data.english_sentences(tier["calib_sentences"]), size)
        held_out = data.english_sentences(tier["eval_sentences"], offset=EVAL_OFFSET)
        self.evaluation = sentence_batches(tokenizer, held_out, size)
        self.reference = sentence_embeddings(self.float_model(), self.evaluation)
        self.linear_names = [p.name for p in plan_quantization(self.float_model(), weight_only(weight_bits=4))]

    def float_model(self, **overrides):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path, **overrides).eval()

    def quantized_model(self, config, **overrides):
        return self.float_model(quantization_config=config, **overrides)

    def cosines(self, model) -> torch.Tensor:
        model.eval()
        return (sentence_embeddings(model, self.evaluation) * self.reference).sum(-1)


def build_fp(row: Row, setup: Setup):
    return setup.float_model(), {"how": "FP32 (from_pretrained, no quantization_config)"}


def build_load(row: Row, setup: Setup):
    how = f"from_pretrained, W{row.bits}" + (f", embeddings {row.embedding_bits}-bit" if row.embedding_bits else "")
    config = weight_only(weight_bits=row.bits, embedding_bits=row.embedding_bits)
    return setup.quantized_model(config), {"how": how, "embedding_bits": row.embedding_bits}


def residual_proxy(model, batch):
    """The label-free sensitivity loss adq_hf used before Gauss-Newton: its Hessian has a residual term."""
    return 0.5 * model(**batch).last_hidden_state.float().pow(2).mean()


def build_mixed(row: Row, setup: Setup):
    """Allocated on the FP model (``plan_mixed_precision``, the tier's sensitivity method and probes),
    then loaded with those ``layer_bits``: the same as ``quantize_model(target_avg_bits=...)`` but
    with the tier's cheaper settings in the quick tier."""
    from adq_hf.mixed_precision import plan_mixed_precision

    tier = setup.tier
    batches = setup.calibration[:tier["sensitivity_batches"]]
    allocation = plan_mixed_precision(setup.float_model(), weight_only(target_avg_bits=row.bits), batches,
                                      method=tier["sensitivity"], max_iters=tier["probes"],
                                      loss_fn=residual_proxy if row.method == "residual" else None)
    model = setup.quantized_model(weight_only(layer_bits=dict(allocation)))
    layers_per_bits = {str(b): sum(1 for v in allocation.values() if v == b) for b in sorted(set(allocation.values()))}
    loss = "0.5*mean(y^2) proxy" if row.method == "residual" else "default loss"
    how = (f"budget {row.bits} bits: {tier['sensitivity']} sensitivity ({loss}) on the FP model, then "
           f"from_pretrained(layer_bits=...); layers per bits {layers_per_bits}")
    return model, {"how": how, "layer_bits": dict(allocation), "layers_per_bits": layers_per_bits}


def build_ptq(row: Row, setup: Setup):
    """PTQ of the model ``from_pretrained`` quantized (so it saves packed), not of a float one."""
    from adq_hf import ptq

    model = setup.quantized_model(weight_only(weight_bits=row.bits))
    ptq.quantize(model, setup.calibration, None, method=row.method, progress=False)  # None: the model's own config
    report = model.ptq_report
    return model, {"how": f"from_pretrained W{row.bits}, then ptq.quantize(method={row.method!r})",
                   "recon_error": sum(r["error"] for r in report.values()),
                   "rtn_recon_error": sum(r["rtn_error"] for r in report.values())}


def build_qat(row: Row, setup: Setup):
    """Dropout is off in the student: with a handful of steps on few sentences its noise would swamp
    the signal, and the FP teacher it imitates runs without it."""
    tier = setup.tier
    student = setup.quantized_model(weight_only(weight_bits=row.bits), hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    before = setup.cosines(student)
    losses = self_distill(student, setup.float_model(), setup.calibration, tier["qat_steps"], tier["qat_lr"])
    how = (f"from_pretrained W{row.bits}, then {tier['qat_steps']} Adam steps (lr {tier['qat_lr']:g}) of "
           f"self-distillation; cosine before {float(before.mean()):.4f}")
    return student, {"how": how, "cosine_before": float(before.mean()), "cosine_min_before": float(before.min()),
                     "steps": tier["qat_steps"], "lr": tier["qat_lr"], "loss_first": losses[0], "loss_last": losses[-1]}


def self_distill(student, teacher, batches: List[dict], steps: int, lr: float) -> List[float]:
    """Adam on ``1 - cos(student, teacher)`` of the mean-pooled embeddings, every student parameter
    (latent weights, biases, norms, embeddings), cycling through ``batches``; in train mode, so the
    ADQ codebooks also adapt (EMA) as the weights move."""
    with torch.no_grad():
        targets = [mean_pooled(teacher, b) for b in batches]  # a fixed teacher: computed once
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    losses = []
    for step in range(steps):
        batch, target = batches[step % len(batches)], targets[step % len(batches)]
        loss = (1 - F.cosine_similarity(mean_pooled(student, batch), target, dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    student.eval()
    return losses


def build_peer(row: Row, setup: Setup):
    """The FP model with every Linear layer adq_hf quantizes replaced by the peer's dequantized weight;
    its stored tensors travel as ``model.peer_storage`` (``measure`` sizes them)."""
    model = setup.float_model()
    calibration = setup.calibration if PEERS[row.method].calibrated else None
    model.peer_storage = quantize_linears(model, setup.linear_names, row.method, int(row.bits), calibration)
    return model, {"how": f"{PEERS[row.method].how}, W{int(row.bits)}"}



def grouped_config(row: Row, **fields):
    """Weight-only ADQ with ``per_group`` tables (the default ``group_tables="scaled"``)."""
    from adq_hf import ADQConfig

    return ADQConfig(activation_bits=None, granularity="per_group", group_size=row.group_size, **fields)


def byte_budget_bits(row: Row, setup: Setup) -> Dict[str, int]:
    """Bits per layer for ``row.bits`` bits per weight *with the tables*: the tier's sensitivity on the FP
    model, then the exact allocation under ``max_bytes = row.bits * params / 8`` (codes + tables)."""
    from adq_hf.mixed_precision import allocate_bits, estimate_sensitivity
    from adq_hf.surgery import plan_quantization

    tier, model = setup.tier, setup.float_model()
    config = grouped_config(row, weight_bits=4)
    names = [p.name for p in plan_quantization(model, config)]
    if "grouped_sensitivity" not in setup.__dict__:  # the same for every such row: measured once per run
        setup.grouped_sensitivity = estimate_sensitivity(
            model, setup.calibration[:tier["sensitivity_batches"]], method=tier["sensitivity"],
            num_batches=tier["sensitivity_batches"], max_iters=tier["probes"], layers=names, progress=False)
    sensitivity = setup.grouped_sensitivity
    params = sum(model.get_submodule(n).weight.numel() for n in names)
    return allocate_bits(model, sensitivity, max_bytes=int(row.bits * params / 8), candidates=(2, 3, 4, 8),
                         config=config)


def build_grouped(row: Row, setup: Setup):
    """``from_pretrained`` with per-group tables, then (as the row says) ``fit_codebooks`` and PTQ."""
    import warnings

    from adq_hf import fit_codebooks, memory_report, ptq

    extra = {}
    if row.kind == "grouped_mixed":
        layer_bits = byte_budget_bits(row, setup)
        config = grouped_config(row, layer_bits=layer_bits)
        counts = {str(b): sum(1 for v in layer_bits.values() if v == b) for b in sorted(set(layer_bits.values()))}
        steps = [f"budget {row.bits} bits per weight with the tables: {setup.tier['sensitivity']} sensitivity on the FP "
                 f"model, allocate_bits(max_bytes=...), layers per bits {counts}; from_pretrained(layer_bits=...)"]
        extra.update(layer_bits=layer_bits, layers_per_bits=counts)
    else:
        config = grouped_config(row, weight_bits=int(row.bits))
        steps = [f"from_pretrained W{int(row.bits)}"]
    steps[-1] += f", per_group {row.group_size} (shared codebook x fp16 group scales)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no MiniLM layer falls back to per channel at 64/128 columns)
        model = setup.quantized_model(config)
    if row.weighting:
        fit_codebooks(model, setup.calibration, row.weighting)
        steps.append(f"fit_codebooks({row.weighting!r})")
        extra["cosine_after_fit"] = float(setup.cosines(model).mean())
    if row.method:
        ptq.quantize(model, setup.calibration, None, method=row.method, progress=False)
        steps.append(f"ptq.quantize(method={row.method!r}, group scales re-fitted)")
        report = model.ptq_report
        extra.update(recon_error=sum(r["error"] for r in report.values()),
                     rtn_recon_error=sum(r["rtn_error"] for r in report.values()))
    extra["table_bits_per_weight"] = memory_report(model)["bits_per_weight"]
    how = ", then ".join(steps) + f"; {extra['table_bits_per_weight']:.3f} bits per weight with the tables"
    return model, {"how": how, **extra}


BUILDERS: Dict[str, Callable] = {"fp": build_fp, "load": build_load, "mixed": build_mixed, "ptq": build_ptq,
                                 "qat": build_qat, "grouped": build_grouped, "grouped_mixed": build_grouped,
                                 "peer": build_peer}


def measure(name: str, setup: Setup) -> dict:
    """Build the row's model, then its fidelity, bits and checkpoint (saved, sized, loaded back)."""
    from transformers import AutoModel

    import adq_hf

    row = ROWS[name]
    torch.manual_seed(0)
    started = time.perf_counter()
    model, extra = BUILDERS[row.kind](row, setup)
    cosines = setup.cosines(model)
    layers = {n: m.weight_numel for n, m in adq_hf.quantized_layers(model)}
    with tempfile.TemporaryDirectory(prefix="b5-") as folder:
        if row.kind == "peer":  # the float tensors + the peer's stored tensors; no loader to reload with
            save_file(state_with_storage(model, model.peer_storage), os.path.join(folder, "model.safetensors"))
            stored, reloaded = model.peer_storage, None
            layers = {n: dict(model.named_modules())[n].weight.numel() for n in stored}
        else:
            model.save_pretrained(folder)
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            stored = adq_checkpoint_storage(files, layers) if layers else {}
            reloaded = float(setup.cosines(AutoModel.from_pretrained(folder)).mean())
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "*.safetensors")))
    nominal = row.bits if row.kind == "peer" else adq_hf.average_weight_bits(model) if layers else 32.0
    result = {"kind": row.kind, "bits": row.bits, "method": row.method, "avg_weight_bits": nominal,
              "bits_per_weight": bits_per_weight(stored, sum(layers.values())) if stored else 32.0,
              "header_bytes": sum(s.header_bytes for s in stored.values()), "quantized_weights": sum(layers.values()),
              "cosine": float(cosines.mean()), "cosine_min": float(cosines.min()),
              "reloaded_cosine": reloaded, "checkpoint_bytes": size, **extra,
              "wall_s": time.perf_counter() - started, "commit": commit(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{name}: cosine {result['cosine']:.4f}, {result['bits_per_weight']:.3f} stored bits/weight, "
          f"{size / MB:.1f} MB, {result['wall_s']:.0f} s", flush=True)
    return result


def markdown(result: dict) -> List[str]:
    rows, settings = result["rows"], result["settings"]
    fp_bytes = rows.get("fp", {}).get("checkpoint_bytes")
    lines = [f"Command: `{result['command']}` (commit {result['commit']}, torch {result['machine']['torch']}, "
             f"{result['machine']['threads']} threads). {result['model']}, weights only (activations float), "
             f"per-channel ADQ codebooks and the peers of benchmarks/weight_only_peers.py on the same Linear layers; "
             f"cosine of mean-pooled embeddings to FP on {settings['eval_sentences']} held-out sentences, "
             f"calibration/training on {settings['calib_sentences']} others.", "",
             "Rows grouped by size class: stored bits per weight of the quantized layers (codes + scales, zeros, "
             "tables at their stored dtype; docs/format.md, \"Bits per weight\"); the best cosine of each class in "
             "bold; frontier: no other row is as small or smaller and as close or closer to FP. Nominal bits: the "
             "code width (for mixed precision the parameter-weighted average).", "",
             "| size class | row | how | nominal bits | stored bits / weight | cosine to FP (mean) | (min) | frontier | "
             "reloaded checkpoint cosine | checkpoint (MB) | / FP checkpoint | wall (s) |",
             "|---|---|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|"]
    frontier = size_frontier(rows)

    def line(cls: str, name: str, r: dict, best: bool) -> str:
        ratio = f"{r['checkpoint_bytes'] / fp_bytes:.3f}" if fp_bytes else ""
        cosine = f"**{r['cosine']:.4f}**" if best else f"{r['cosine']:.4f}"
        reloaded = "" if r.get("reloaded_cosine") is None else f"{r['reloaded_cosine']:.4f}"
        return (f"| {cls} | {name} | {r['how']} | {r['avg_weight_bits']:.2f} | {r['bits_per_weight']:.3f} | {cosine} | "
                f"{r['cosine_min']:.4f} | {'yes' if name in frontier else ''} | {reloaded} | "
                f"{r['checkpoint_bytes'] / MB:.2f} | {ratio} | {r['wall_s']:.0f} |")

    if "fp" in rows:
        lines.append(line("FP32", "fp", rows["fp"], False))
    classes = by_size_class(rows)
    for cls, names, best in classes:
        lines += [line(cls, n, rows[n], n == best) for n in names]
    earlier = unsized_rows(rows)
    if earlier:
        lines += ["", "Rows from a run before stored bits were recorded (their commit is in the JSON; "
                  "`--restart --rows " + " ".join(earlier) + "` measures them again), not in the classes:", "",
                  "| row | how | nominal bits | cosine to FP (mean) | (min) | checkpoint / FP checkpoint | commit |",
                  "|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {n} | {rows[n]['how']} | {rows[n]['avg_weight_bits']:.2f} | {rows[n]['cosine']:.4f} | "
                  f"{rows[n]['cosine_min']:.4f} | {rows[n]['checkpoint_bytes'] / fp_bytes:.3f} | {rows[n]['commit']} |"
                  for n in earlier]
    lines += ["", "Best row of each size class, adq_hf against the peers:", "",
              "| size class | best adq_hf row | cosine | stored bits | best peer row | cosine | stored bits |",
              "|---|---|---:|---:|---|---:|---:|"]
    for cls, names, _ in classes:
        cells = []
        for family in (lambda n: rows[n]["kind"] != "peer", lambda n: rows[n]["kind"] == "peer"):
            members = [n for n in names if family(n)]
            top = max(members, key=lambda n: rows[n]["cosine"]) if members else None
            cells.append(f"{top} | {rows[top]['cosine']:.4f} | {rows[top]['bits_per_weight']:.3f}" if top else "- | | ")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    header = max((r.get("header_bytes", 0) for r in rows.values()), default=0)
    lines += ["", f"The word/position/type embeddings ({result['float_embedding_bytes'] / MB:.1f} MB of FP32) stay "
              "float in every checkpoint but the `_emb` rows (`embedding_bits`); only those rows count them in the "
              "bits. MB = 10^6 bytes. Peer checkpoints: "
              "the model's float tensors plus each layer's stored tensors in safetensors (sized, not reloaded: "
              f"no loader). Per-layer configuration (bit width, shape, JSON quant state, counters) is not counted "
              f"in the bits per weight: at most {header:,} bytes per model in any row."]
    if result["resumed_rows"]:
        lines.append(f"Rows reused from an earlier invocation (their own commit and time are in the JSON): "
                     f"{', '.join(result['resumed_rows'])}.")
    return lines


def previous_rows(path: str, settings: dict) -> dict:
    """Rows of an earlier run of the same tier with the same settings (empty if none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        earlier = json.load(fh)
    return earlier.get("rows", {}) if earlier.get("settings") == settings else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm",
                        help="minilm: all-MiniLM-L6-v2 (results transformers_fidelity_<tier>.*); mpnet: all-mpnet-base-v2 "
                             "(transformers_fidelity_mpnet_<tier>.*)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: the tier's rows")
    parser.add_argument("--restart", action="store_true", help="run every row again, even if stored")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = {k: v for k, v in TIERS[args.tier].items() if k != "rows"}
    stem = "transformers_fidelity_" + ("" if args.model == "minilm" else f"{args.model}_") + args.tier
    rows = {} if args.restart else previous_rows(os.path.join(args.out, stem + ".json"), settings)
    resumed = [name for name in rows]
    wanted = ["fp"] + [n for n in (args.rows or TIERS[args.tier]["rows"]) if n != "fp"]  # FP: the size reference
    setup = Setup(TIERS[args.tier], args.model)
    embedding_bytes = sum(p.numel() * p.element_size() for p in setup.float_model().embeddings.parameters())
    started = time.perf_counter()

    def result() -> dict:
        return {"benchmark": f"B5 transformers fidelity ({MODELS[args.model][0]})", "model": MODELS[args.model][0],
                "tier": args.tier, "settings": settings,
                "rows": {n: rows[n] for n in ROWS if n in rows}, "resumed_rows": resumed,
                "float_embedding_bytes": embedding_bytes, "wall_s": time.perf_counter() - started,
                **run_record("transformers_fidelity.py", argv)}

    for name in wanted:
        if name in rows:
            print(f"{name}: stored, skipped (--restart runs it again)")
            continue
        rows[name] = measure(name, setup)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, stem + ".json"), "w") as fh:  # what a rerun resumes from
            json.dump(result(), fh, indent=2)
    final = result()
    write_results(args.out, stem, final, markdown(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
