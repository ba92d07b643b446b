#!/usr/bin/env python
"""B3: deployment -- packed checkpoint and resident weight memory against the information limit and
fp32, inference latency of deploy mode against the FP model (PyTorch and onnxruntime), load time.

    python benchmarks/deploy.py --tier standard [--models resnet20-w2a2 resnet20-w4a4 minilm-w4 decode] [--threads 1]
                                [--layers N]

Models: ResNet-20 on Fashion-MNIST shapes (``timm.create_model("resnet20_cifar", num_classes=10,
in_chans=1)``, inputs [N, 1, 28, 28], ADQ W2A2 and W4A4 with N2UQ activations, first conv and
classifier 8-bit, calibrated on one random batch; weights untrained: sizes and latencies do not
depend on training) and all-MiniLM-L6-v2 (real weights, ADQ W4 weight-only, inputs: real sentences
padded to 32 tokens). Every variant of a model runs in the same process, interleaved call by call,
so machine drift hits all alike; the tables give medians. Latency variants: ``fp`` (the float
model), ``fake-quant`` (eval mode), ``deploy`` (default: decode at every call), ``deploy-cache``
(every decoded weight cached), ``deploy-compile`` (torch.compile, standard tier), ``ort-fp``,
``ort-deploy`` (the LUT-form ONNX; onnxruntime folds the decode into float weights when it loads
the file) and ``ort-deploy-lut`` (the same file with onnxruntime's constant folding off: the table
look-up runs at every call).

``decode``: a causal LM with Qwen2.5-0.5B's shapes (``benchmarks/common.py``: hidden 896, intermediate
4864, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, tied embeddings, random weights; ``--layers
N`` for a scaled-down model; the quick tier uses tiny shapes), one sequence, a 16-token prompt, then 64
new tokens one at a time with the KV cache (greedy): decode tokens/s (prefill not counted) of ``fp32``,
``bf16`` (the same weights cast), ``adq-w4`` and ``adq-w3`` (ADQ per-channel codebooks on every decoder
Linear, weights only, deploy mode: the fused look-up-table kernel), ``adq-w4-exact`` (the same model with
``exact=True``: decoded weights and ``F.linear``) and ``hqq-w4-g64`` (hqq's ``HQQLinear``, 4 bits, groups
of 64, compute fp32, on the same Linear layers). The tied embedding / LM head stays float and shared
in those variants (HQQ has no embedding format); ``adq-w4-emb4`` is ``adq-w4`` with the tied
embedding / LM head quantized too (``embedding_bits=4, last_layer_bits=4``: one 4-bit per-row table,
stored once; the head reads it through the fused kernel, the embedding decodes only the rows it looks up). Variants take turns, one whole generation each, ``rounds`` times; medians.

Results: benchmarks/results/deploy_<tier>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, qwen_shaped_lm, run_record, write_results  # noqa: E402

MODELS = ("resnet20-w2a2", "resnet20-w4a4", "minilm-w4", "decode")
TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 512}
TIERS = {
    "quick": {"rounds": 3, "batches": [1, 64], "loads": 2, "compile": False, "seq_len": 32,
              "decode": {"rounds": 2, "prompt": 16, "new_tokens": 8, "layers": 2, "shapes": TINY_LM}},
    "standard": {"rounds": 25, "batches": [1, 64], "loads": 7, "compile": True, "seq_len": 32,
                 "decode": {"rounds": 3, "prompt": 16, "new_tokens": 64, "layers": 24, "shapes": {}}},
}
FALLBACK_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Quantized models are small and fast."]


def _median_ms(values):
    return 1e3 * statistics.median(values)


def resnet_case(bits: int):
    """``(fp model, fake-quant model, inputs(batch), save, load_fp, load_fq, load_deploy)`` for ResNet-20."""
    import timm

    import adq_hf
    from adq_hf import ADQConfig

    def build():
        torch.manual_seed(0)
        return timm.create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()

    fp = build()
    fq = adq_hf.quantize_model(build(), ADQConfig(weight_bits=bits, activation_bits=bits))
    adq_hf.calibrate_activations(fq, [torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))])
    fq.eval()

    def inputs(batch):
        return (torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)),), {}

    def load_fp(fp_file):
        from safetensors.torch import load_file

        model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
        model.load_state_dict(load_file(fp_file))
        return model.eval()

    return {
        "fp": fp, "fq": fq, "inputs": inputs,
        "save": lambda folder: adq_hf.save_pretrained(fq, folder),
        "load_fp": load_fp,
        "load_fq": lambda folder: timm.create_model(f"local-dir:{folder}").eval(),
        "load_deploy": lambda folder: timm.create_model(f"local-dir:{folder}", deploy=True),
    }


def minilm_case(seq_len: int):
    from transformers import AutoModel, AutoTokenizer

    import adq_hf
    from adq_hf import ADQConfig
    from adq_hf.data import english_sentences, minilm_path

    path = minilm_path()
    fp = AutoModel.from_pretrained(path).eval()
    fq = AutoModel.from_pretrained(path, quantization_config=ADQConfig(weight_bits=4, activation_bits=None)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = english_sentences(64) or FALLBACK_SENTENCES
    sentences = (sentences * (64 // len(sentences) + 1))[:64]

    def inputs(batch):
        enc = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return {
        "fp": fp, "fq": fq, "inputs": inputs,
        "save": lambda folder: fq.save_pretrained(folder),
        "load_fp": lambda _fp_file: AutoModel.from_pretrained(path).eval(),
        "load_fq": lambda folder: AutoModel.from_pretrained(folder).eval(),
        "load_deploy": lambda folder: adq_hf.convert_for_inference(AutoModel.from_pretrained(folder)),
    }


def _output(out):
    return out if torch.is_tensor(out) else out[0]


def _checkpoint_split(path: str, quantized_names) -> dict:
    """Bytes of a packed checkpoint's tensors: quantized layers' weights (codes + weight quantizer) and the rest."""
    from safetensors import safe_open

    quantized = other = 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            nbytes = tensor.numel() * tensor.element_size()
            if any(key == f"{n}.weight" or key.startswith(f"{n}.weight_quantizer.") for n in quantized_names):
                quantized += nbytes
            else:
                other += nbytes
    return {"quantized_layers_bytes": quantized, "other_tensors_bytes": other}


def measure(name: str, tier: dict, threads: int, work: str) -> dict:
    import onnxruntime as ort
    from safetensors.torch import save_file

    import adq_hf
    from adq_hf.deploy import export_onnx, memory_report, onnx_feed, onnx_session, resident_bytes, set_weight_cache

    case = resnet_case(int(name[-3])) if name.startswith("resnet20") else minilm_case(tier["seq_len"])
    fp, fq = case["fp"], case["fq"]
    folder, fp_file = os.path.join(work, name), os.path.join(work, f"{name}-fp32.safetensors")
    case["save"](folder)
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, fp_file)
    packed_file = os.path.join(folder, "model.safetensors")
    names = [n for n, _ in adq_hf.quantized_layers(fq)]
    row = {"model": name, "quantized_layers": len(names)}

    # load time (each loader interleaved, medians)
    loads = {"fp": [], "fake-quant": [], "deploy": []}
    for _ in range(tier["loads"]):
        for key, loader, arg in (("fp", case["load_fp"], fp_file), ("fake-quant", case["load_fq"], folder),
                                 ("deploy", case["load_deploy"], folder)):
            start = time.perf_counter()
            loaded = loader(arg)
            loads[key].append(time.perf_counter() - start)
    deployed = loaded
    row["load_ms"] = {k: _median_ms(v) for k, v in loads.items()}

    # sizes and memory
    fq_mem, dep_mem = memory_report(fq), memory_report(deployed)
    row["checkpoint"] = {"packed_bytes": os.path.getsize(packed_file), "fp32_bytes": os.path.getsize(fp_file),
                         "information_limit_bytes": dep_mem["information_limit_bytes"],
                         **_checkpoint_split(packed_file, names)}
    row["memory"] = {"information_limit_bytes": dep_mem["information_limit_bytes"],
                     "fp32_weight_bytes": dep_mem["fp32_weight_bytes"],
                     "deploy_weight_bytes": dep_mem["quantized_weight_bytes"],
                     "fake_quant_weight_bytes": fq_mem["quantized_weight_bytes"],
                     "fp_model_bytes": resident_bytes(fp), "fake_quant_model_bytes": fq_mem["resident_bytes"],
                     "deploy_model_bytes": dep_mem["resident_bytes"]}

    # exactness of deploy mode
    args, kwargs = case["inputs"](8)
    with torch.no_grad():
        row["deploy_equals_fake_quant"] = bool(torch.equal(_output(deployed(*args, **kwargs)), _output(fq(*args, **kwargs))))

    # variants
    cached = copy.deepcopy(deployed)
    set_weight_cache(cached, None)
    row["memory"]["deploy_cache_model_bytes"] = resident_bytes(cached)
    variants = {"fp": fp, "fake-quant": fq, "deploy": deployed, "deploy-cache": cached}
    row["compile_s"] = None
    if tier["compile"]:
        compiled = copy.deepcopy(deployed)
        compiled.compile()
        variants["deploy-compile"] = compiled
        start = time.perf_counter()
        with torch.no_grad():
            for batch in tier["batches"]:
                a, k = case["inputs"](batch)
                compiled(*a, **k)
        row["compile_s"] = time.perf_counter() - start

    # onnx
    example = case["inputs"](2)
    example = example[1] if example[1] else example[0]
    fp_onnx = export_onnx(fp, example, os.path.join(work, f"{name}-fp.onnx"))
    dep_onnx = export_onnx(deployed, example, os.path.join(work, f"{name}-deploy.onnx"))
    row["onnx"] = {"fp_bytes": fp_onnx["bytes"], "deploy_bytes": dep_onnx["bytes"], "deploy_rel_l2": dep_onnx["rel_l2"],
                   "deploy_max_abs_diff": dep_onnx["max_abs_diff"]}
    sessions = {"ort-fp": onnx_session(fp_onnx["path"], threads), "ort-deploy": onnx_session(dep_onnx["path"], threads)}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    sessions["ort-deploy-lut"] = ort.InferenceSession(dep_onnx["path"], options, providers=["CPUExecutionProvider"],
                                                      disabled_optimizers=["ConstantFolding"])

    row["latency_ms"] = {}
    for batch in tier["batches"]:
        a, k = case["inputs"](batch)
        example = k if k else a
        calls = {n: (lambda m=m: m(*a, **k)) for n, m in variants.items()}
        calls.update({n: (lambda s=s: s.run(None, onnx_feed(s, example))) for n, s in sessions.items()})
        times = {n: [] for n in calls}
        with torch.no_grad():
            for call in calls.values():  # warm-up
                call()
            for _ in range(tier["rounds"]):
                for n, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[n].append(time.perf_counter() - start)
        row["latency_ms"][str(batch)] = {n: _median_ms(v) for n, v in times.items()}
    return row


def _hqq(module, bits: int = 4, group_size: int = 64):
    """Every Linear of ``module`` as hqq's HQQLinear (compute fp32, CPU), in place."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, HQQLinear(child, config, compute_dtype=torch.float32, device="cpu"))
    return module


def _adq_deploy(bits: int):
    import adq_hf
    from adq_hf import ADQConfig

    config = ADQConfig(weight_bits=bits, activation_bits=None, granularity="per_channel")
    return lambda layer: adq_hf.convert_for_inference(adq_hf.quantize_model(layer, config))


def _with_quantized_layers(fp, quantize_layer):
    """A copy of ``fp`` sharing every float tensor but its decoder layers, each copied and quantized in
    turn (one float layer copy at a time in memory)."""
    model = copy.deepcopy(fp, memo={id(p): p for p in fp.parameters()})
    for i, layer in enumerate(fp.model.layers):
        model.model.layers[i] = quantize_layer(copy.deepcopy(layer))
    return model


def decode_variants(settings: dict, layers=None) -> dict:
    """The decode workload's models; the tied embedding / LM head tensor is shared by all but bf16 and adq-w4-emb4."""
    import adq_hf
    from adq_hf import ADQConfig

    fp = qwen_shaped_lm(layers or settings["layers"], **settings["shapes"])
    # cast parameter by parameter: no second fp32 copy of the model at any time
    bf16 = copy.deepcopy(fp, memo={id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                                   for p in fp.parameters()}).to(torch.bfloat16)
    variants = {"fp32": fp, "bf16": bf16}
    for bits in (4, 3):
        variants[f"adq-w{bits}"] = _with_quantized_layers(fp, _adq_deploy(bits))
    variants["adq-w4-exact"] = exact = copy.deepcopy(variants["adq-w4"], memo={id(p): p for p in fp.parameters()})
    adq_hf.deploy.set_exact(exact)
    # the tied embedding / LM head at 4 bits as well (its module objects copied, the float tensor shared
    # until deploy mode drops it from the copies)
    tied = copy.deepcopy(variants["adq-w4"], memo={id(p): p for p in fp.parameters()})
    adq_hf.quantize_model(tied, ADQConfig(weight_bits=4, activation_bits=None, granularity="per_channel",
                                          embedding_bits=4, last_layer_bits=4))
    variants["adq-w4-emb4"] = adq_hf.convert_for_inference(tied)
    variants["hqq-w4-g64"] = _with_quantized_layers(fp, _hqq)
    return variants


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding with the KV cache: tokens/s of the ``new_tokens`` single-token steps."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return new_tokens / (time.perf_counter() - start)


def measure_decode(settings: dict, layers=None) -> dict:
    from adq_hf.deploy import resident_bytes

    start = time.perf_counter()
    variants = decode_variants(settings, layers)
    build_s = time.perf_counter() - start
    config = variants["fp32"].config
    prompt = torch.randint(0, config.vocab_size, (1, settings["prompt"]), generator=torch.Generator().manual_seed(0))
    speeds = {name: [] for name in variants}
    for name, model in variants.items():  # warm-up (and the kernels' first call)
        decode_tokens_per_s(model, prompt, 2)
    for _ in range(settings["rounds"]):
        for name, model in variants.items():
            speeds[name].append(decode_tokens_per_s(model, prompt, settings["new_tokens"]))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    return {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "prompt": settings["prompt"], "new_tokens": settings["new_tokens"], "rounds": settings["rounds"],
            "build_s": build_s, "tokens_per_s": median, "tokens_per_s_all": speeds,
            "ratio_to_fp32": {name: v / median["fp32"] for name, v in median.items()},
            "ratio_to_bf16": {name: v / median["bf16"] for name, v in median.items()},
            "resident_bytes": {name: resident_bytes(model) for name, model in variants.items()}}


def markdown(result: dict) -> list:
    lines = [f"B3 deployment, tier {result['tier']}, {result['machine']['cpus']} CPUs, {result['threads']} thread(s), "
             f"torch {result['machine']['torch']}, onnxruntime {result['onnxruntime']}, commit {result['commit']}, "
             f"{result['time']}", ""]
    if result.get("decode"):
        lines += decode_markdown(result["decode"]) + [""]
    if result["rows"]:
        lines += rows_markdown(result)
    return lines


def decode_markdown(d: dict) -> list:
    lines = [f"Decode: Qwen2.5-0.5B shapes with {d['layers']} layers (hidden {d['hidden_size']}, intermediate "
             f"{d['intermediate_size']}, vocabulary {d['vocab_size']}, random weights), 1 sequence, {d['prompt']}-token "
             f"prompt, {d['new_tokens']} new tokens with the KV cache; median of {d['rounds']} generations per variant, "
             "taking turns:", "",
             "| variant | tokens/s | / fp32 | / bf16 | resident MB |", "|---|---:|---:|---:|---:|"]
    for name, speed in d["tokens_per_s"].items():
        lines.append(f"| {name} | {speed:.2f} | {d['ratio_to_fp32'][name]:.2f}x | {d['ratio_to_bf16'][name]:.2f}x | "
                     f"{d['resident_bytes'][name] / 1e6:.1f} |")
    return lines


def rows_markdown(result: dict) -> list:
    mb = 1e6
    lines = ["| model | packed checkpoint (MB) | fp32 checkpoint (MB) | quantized layers in checkpoint / information limit | "
             "deploy weight memory / information limit | deploy weights / fp32 weights | resident model: FP / fake-quant / deploy / deploy-cache (MB) | "
             "deploy == fake-quant | ONNX FP / deploy (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        c, m, o = r["checkpoint"], r["memory"], r["onnx"]
        lines.append(
            f"| {r['model']} | {c['packed_bytes'] / mb:.3f} | {c['fp32_bytes'] / mb:.3f} | "
            f"{c['quantized_layers_bytes'] / c['information_limit_bytes']:.3f} | "
            f"{m['deploy_weight_bytes'] / m['information_limit_bytes']:.3f} | {m['deploy_weight_bytes'] / m['fp32_weight_bytes']:.3f} | "
            f"{m['fp_model_bytes'] / mb:.2f} / {m['fake_quant_model_bytes'] / mb:.2f} / {m['deploy_model_bytes'] / mb:.2f} / "
            f"{m['deploy_cache_model_bytes'] / mb:.2f} | {r['deploy_equals_fake_quant']} | "
            f"{o['fp_bytes'] / mb:.3f} / {o['deploy_bytes'] / mb:.3f} |")
    lines += ["", "Latency, median ms per call (ratio to `fp` of the same run):", ""]
    variants = list(next(iter(result["rows"]))["latency_ms"]["1"])
    lines += ["| model | batch | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    for r in result["rows"]:
        for batch, lat in r["latency_ms"].items():
            cells = [f"{lat[v]:.2f} ({lat[v] / lat['fp']:.2f}x)" if v in lat else "" for v in variants]
            lines.append(f"| {r['model']} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "| model | load FP (ms) | load fake-quant (ms) | load deploy (ms) | torch.compile time (s) | ONNX rel. L2 to PyTorch |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(f"| {r['model']} | {r['load_ms']['fp']:.1f} | {r['load_ms']['fake-quant']:.1f} | "
                     f"{r['load_ms']['deploy']:.1f} | {compile_s} | {r['onnx']['deploy_rel_l2']:.2g} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="standard")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the decode workload's model "
                        "(default: the tier's; 24 in the standard tier)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per decode measurement "
                        "(default: the tier's; 64 in the standard tier)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    import onnxruntime

    tier = TIERS[args.tier]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="adq_hf-deploy-bench-") as work:
            rows = [measure(name, tier, args.threads, work) for name in args.models if name != "decode"]
        settings = dict(tier["decode"], **({"new_tokens": args.new_tokens} if args.new_tokens else {}))
        decode = measure_decode(settings, args.layers) if "decode" in args.models else None
    finally:
        torch.set_num_threads(threads)
    from adq_hf.deploy import kernel_info

    result = {"benchmark": "B3 deployment", "tier": args.tier, "settings": tier, "threads": args.threads,
              "onnxruntime": onnxruntime.__version__, "kernels": kernel_info(), "rows": rows, "decode": decode,
              **run_record("deploy.py", argv)}
    write_results(args.out, f"deploy_{args.tier}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
