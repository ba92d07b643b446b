#!/usr/bin/env python
"""B6: one-shot paths at LLM size -- quantize-on-load, eval forward, PTQ and peak memory.

    python benchmarks/scale.py --tier standard [--layers N] [--rows ...] [--ptq-sequences 128 --ptq-length 512]

A causal LM with Qwen2.5-0.5B's shapes (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV
heads, vocabulary 151,936, tied embeddings; ``--layers N`` for a scaled-down model), random weights
saved once as safetensors in ``--cache-dir``. Every row runs in its own subprocess (peak resident
memory = that process's ``VmHWM``):

- ``float``: ``from_pretrained`` in fp32;
- ``adq_w4_per_channel`` / ``adq_w4_per_tensor``: ``from_pretrained(..., quantization_config=ADQConfig(
  weight_bits=4, granularity=...))``: quantize-on-load;
- ``hqq_w4_g64``: float load, then every Linear (the tied LM head stays float, as in adq_hf) replaced
  by ``hqq.core.quantize.HQQLinear`` (4 bits, group 64, fp32 compute; transformers' ``HqqConfig``
  raises "not available yet" in 5.23);
- ``ptq_gptq`` / ``ptq_sa``: quantize-on-load at W4 per channel, then block-by-block ``ptq.quantize``
  on ``--ptq-sequences`` random-token sequences of ``--ptq-length`` tokens (random weights: any
  tokens are as good as text).

Load/quantize rows also time an eval forward of 16 tokens (batch 1, no grad): the first call (adq_hf
decodes each weight once, the eval-mode decode cache) and the median of the following calls,
against the float row's. Results: benchmarks/results/scale_<tier>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run_record, write_results  # noqa: E402

QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
TIERS = {
    "quick": {"shape": {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
              "ptq_sequences": 4, "ptq_length": 32, "forward_repeats": 2},
    "standard": {"shape": QWEN25_05B, "ptq_sequences": 128, "ptq_length": 512, "forward_repeats": 5},
}
ROWS = ["float", "adq_w4_per_channel", "adq_w4_per_tensor", "hqq_w4_g64", "ptq_gptq", "ptq_sa"]
FORWARD_TOKENS = 16


def model_dir(cache_dir: str, shape: dict) -> str:
    """The random-weight checkpoint of ``shape`` (saved once: safetensors + config.json)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"qwen2-shape-{shape['num_hidden_layers']}l-{digest}")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        model.save_pretrained(path + ".tmp", safe_serialization=True)
        del model
        os.replace(path + ".tmp", path)
    return path


def _peak_mb() -> float:
    """This process's peak resident set (MB): ``VmHWM``, which starts afresh with the process's own memory
    map. ``ru_maxrss`` does not: Linux carries it over ``execve``, so a row's subprocess reported the
    parent's peak (the checkpoint writer's) whatever the row did."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _forward_times(model, vocab: int, repeats: int) -> dict:
    import torch

    ids = torch.randint(0, vocab, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {"forward_first_s": times[0], "forward_s": statistics.median(times[1:])}


def run_row(row: str, path: str, tier: dict) -> dict:
    """One row, in this process (the driver starts one process per row)."""
    import torch
    from transformers import AutoModelForCausalLM

    import adq_hf
    from adq_hf import ADQConfig

    torch.set_num_threads(int(os.environ.get("ADQ_BENCH_THREADS", "1")))
    vocab = tier["shape"]["vocab_size"]
    result = {"row": row, "baseline_mb": _peak_mb()}  # the process with torch, transformers, adq_hf imported
    start = time.perf_counter()
    if row == "float" or row == "hqq_w4_g64":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        result["load_s"] = time.perf_counter() - start
        if row == "hqq_w4_g64":
            result["quantize_s"] = _hqq_quantize(model)
            result["layers"] = sum(1 for m in model.modules() if type(m).__name__ == "HQQLinear")
    else:
        granularity = "per_tensor" if row == "adq_w4_per_tensor" else "per_channel"
        with _timed_quantizer_hooks() as quantize_s:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, quantization_config=ADQConfig(weight_bits=4, granularity=granularity)).eval()
        result["load_s"] = time.perf_counter() - start  # quantize-on-load: loading and quantizing in one step
        result["quantize_s"] = quantize_s[0]  # of which adq_hf's hooks (layer swap, codebooks from the weights)
        result["layers"] = len(adq_hf.quantized_layers(model))
    result["peak_after_load_mb"] = _peak_mb()
    if row.startswith("ptq_"):
        ids = torch.randint(0, vocab, (tier["ptq_sequences"], tier["ptq_length"]), generator=torch.Generator().manual_seed(1))
        batches = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in range(0, len(ids), 8)]
        start = time.perf_counter()
        adq_hf.ptq.quantize(model, batches, method=row.split("_")[1], progress=False)
        result["ptq_s"] = time.perf_counter() - start
        result["ptq_plan"] = model.ptq_plan
        result["ptq_tokens"] = int(ids.numel())
    else:
        result.update(_forward_times(model, vocab, tier["forward_repeats"]))
    result["peak_mb"] = _peak_mb()
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


class _timed_quantizer_hooks:
    """Seconds spent in adq_hf's transformers hooks (before and after weight loading) inside the block."""

    def __enter__(self):
        from adq_hf.integrations.transformers import ADQHfQuantizer

        self.seconds, self.cls = [0.0], ADQHfQuantizer
        self.originals = {n: getattr(ADQHfQuantizer, n) for n in ("_process_model_before_weight_loading",
                                                                  "_process_model_after_weight_loading")}
        for name, original in self.originals.items():
            def timed(quantizer, *args, original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return original(quantizer, *args, **kwargs)
                finally:
                    self.seconds[0] += time.perf_counter() - start
            setattr(ADQHfQuantizer, name, timed)
        return self.seconds

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(self.cls, name, original)


def _hqq_quantize(model) -> float:
    """Every Linear except a tied LM head -> HQQLinear (4 bits, group 64); seconds."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    tied = id(model.get_output_embeddings()) if model.config.tie_word_embeddings else None
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) != tied]
    config = BaseQuantizeConfig(nbits=4, group_size=64)
    start = time.perf_counter()
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu"))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=list(TIERS), default="standard")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the tier's; 24 = Qwen2.5-0.5B)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--ptq-sequences", type=int)
    parser.add_argument("--ptq-length", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "adq_hf", "scale"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--in-process", action="store_true",
                        help="run the rows in this process (quick tier default: no per-row peak memory)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tier = json.loads(json.dumps(TIERS[args.tier]))
    if args.layers is not None:
        tier["shape"]["num_hidden_layers"] = args.layers
    for key in ("ptq_sequences", "ptq_length"):
        if getattr(args, key) is not None:
            tier[key] = getattr(args, key)
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row, args.model_dir, tier)))
        return 0

    path = model_dir(args.cache_dir, tier["shape"])
    in_process = args.in_process or args.tier == "quick"
    rows = {}
    for row in args.rows:
        if in_process:
            started = time.perf_counter()
            rows[row] = {**run_row(row, path, tier), "process_s": time.perf_counter() - started}
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--model-dir", path, "--tier", args.tier]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in (("layers", args.layers), ("ptq_sequences", tier["ptq_sequences"]),
                                                             ("ptq_length", tier["ptq_length"])) if v is not None]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ADQ_BENCH_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"row {row} failed:\n{proc.stderr[-4000:]}")
        rows[row] = {**json.loads(line[len("RESULT "):]), "process_s": time.perf_counter() - started}
        print(row, json.dumps(rows[row]), flush=True)
    shape = tier["shape"]
    fp32_bytes = rows["float"]["params"] * 4 if "float" in rows else None
    result = {"benchmark": "B6 scale", "tier": args.tier, "shape": shape, "rows": rows, "threads": args.threads,
              "ptq_sequences": tier["ptq_sequences"], "ptq_length": tier["ptq_length"],
              "forward_tokens": FORWARD_TOKENS, "fp32_model_mb": None if fp32_bytes is None else fp32_bytes / 2**20,
              "rows_in_one_process": in_process,
              **run_record("scale.py", argv)}
    write_results(args.out, f"scale_{args.tier}", result, markdown(result))
    return 0


def markdown(result: dict) -> list:
    rows, shape = result["rows"], result["shape"]
    fp = rows.get("float", {})
    hqq = rows.get("hqq_w4_g64", {})
    lines = [f"B6: causal LM with Qwen2.5-0.5B's shapes, {shape['num_hidden_layers']} layers, random weights "
             f"({fp.get('params', 0) / 1e6:.1f}M parameters, fp32 {result['fp32_model_mb'] or 0:.1f} MB); "
             f"{result['threads']} thread(s).", "",
             "| row | layers | load (s) | quantize (s) | quantize / HQQ | forward 16 tokens (s) | / float | first forward (s) "
             "| PTQ (s) | peak RSS after load (MB) | peak RSS (MB) | load peak above imports / fp32 model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(value, fmt="{:.2f}"):
        return "" if value is None else fmt.format(value)

    for name, r in rows.items():
        q_ratio = r.get("quantize_s") / hqq["quantize_s"] if "quantize_s" in r and "quantize_s" in hqq else None
        f_ratio = r["forward_s"] / fp["forward_s"] if "forward_s" in r and "forward_s" in fp else None
        fp32_mb = result["fp32_model_mb"]
        m_ratio = (r["peak_after_load_mb"] - r["baseline_mb"]) / fp32_mb if fp32_mb and not result["rows_in_one_process"] \
            else None
        lines.append(f"| {name} | {r.get('layers', '')} | {num(r.get('load_s'))} | {num(r.get('quantize_s'))} | {num(q_ratio)} | "
                     f"{num(r.get('forward_s'), '{:.3f}')} | {num(f_ratio)} | {num(r.get('forward_first_s'), '{:.3f}')} | "
                     f"{num(r.get('ptq_s'), '{:.1f}')} | {num(r.get('peak_after_load_mb'), '{:.0f}')} | "
                     f"{num(r.get('peak_mb'), '{:.0f}')} | {num(m_ratio)} |")
    lines += ["", "quantize (s): adq_hf, the time in its loading hooks (layer swap, codebooks from the loaded weights; "
              "load (s) is the whole from_pretrained); HQQ, replacing the Linear layers of the loaded float model. "
              "Peak RSS: VmHWM of the row's process" + (" (all rows in one process here: cumulative, no ratio)"
                                                             if result["rows_in_one_process"] else "")
              + "; the last column is the peak after loading minus the process's size after its imports, over the "
              "fp32 parameter bytes.", f"PTQ: block by block on {result['ptq_sequences']} random-token sequences of {result['ptq_length']} "
              "tokens, quantize-on-load at W4 per channel first (included in its peak memory, not in its time).",
              "Targets: quantize-on-load <= HQQ's quantize time; eval forward <= 1.5x float; PTQ <= 30 min; "
              "peak memory of quantize-on-load <= 1.5x the fp32 model.", "",
              f"Command: `{result['command']}` (commit {result['commit']}, {result['machine']['cpus']} cores, "
              f"torch {result['machine']['torch']})"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
