"""What every benchmark shares: the run record (machine, torch, commit, time, command), result
files (JSON + markdown), the Fashion-MNIST full-precision ResNet-20 teacher of the recipes, and
all-MiniLM-L6-v2's sentence embeddings (B2 and B5 compare models by them)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_CONFIG = os.path.join(ROOT, "recipes", "configs", "fmnist_resnet20_w4a4.yaml")
TEACHER_OVERRIDES = ["teacher.epochs=2", "optim.warmup_steps=30"]  # the B1 standard tier's teacher


def run_record(script: str, argv) -> dict:
    import torch

    return {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_results(out_dir: str, stem: str, result: dict, markdown_lines: List[str]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    with open(path + ".md", "w") as fh:
        fh.write("\n".join(markdown_lines) + "\n")
    print("\n".join(markdown_lines))
    return path


def fmnist_teacher(cache_dir=None, overrides=None) -> str:
    """Path of the recipes' FP ResNet-20 Fashion-MNIST teacher (B1 standard tier settings), trained
    once by the recipe itself (``optim.max_steps=1`` skips any real QAT) when not cached yet."""
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import qat_imagenet

    overrides = (TEACHER_OVERRIDES if overrides is None else overrides) + ([f"cache_dir={cache_dir}"] if cache_dir else [])
    path = qat_imagenet.teacher_cache_path(qat_imagenet.load_config(TEACHER_CONFIG, overrides))
    if not os.path.isfile(path):
        out = os.path.join(ROOT, "outputs", "benchmarks", "teacher")
        cmd = [sys.executable, os.path.join(ROOT, "recipes", "qat_imagenet.py"), "--config", TEACHER_CONFIG,
               "--output-dir", out, "--set", *overrides, "optim.max_steps=1"]
        print("training the FP teacher once (cached):", " ".join(cmd))
        subprocess.run(cmd, check=True)
    return path


def sentence_batches(tokenizer, sentences: List[str], batch_size: int) -> List[dict]:
    """Tokenised batches (dicts of model inputs), each padded only to its own longest sentence."""
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def mean_pooled(model, batch: dict):
    """all-MiniLM-L6-v2's sentence embedding before normalisation (what sentence-transformers
    computes): the attention-masked mean of the last hidden state."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def sentence_embeddings(model, batches: List[dict]):
    """Unit-length mean-pooled embeddings of every sentence in ``batches`` (no grad, the model's
    current mode): the dot product of two models' embeddings is their cosine similarity."""
    import torch

    with torch.no_grad():
        return torch.nn.functional.normalize(torch.cat([mean_pooled(model, b) for b in batches]), dim=-1)


# Qwen2.5-0.5B's shapes (B3's decode workload; B6 builds the same model)
QWEN25_05B_SHAPES = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}


def qwen_shaped_lm(layers=None, seed: int = 0, **overrides):
    """A causal LM with Qwen2.5-0.5B's shapes (``layers``: fewer decoder layers for a scaled-down
    model; ``overrides``: other config fields, e.g. tiny shapes for a quick tier) and random weights
    (transformers' own initialisation, seeded), in eval mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = dict(QWEN25_05B_SHAPES, **overrides)
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**fields)).eval()


# B5's size classes (docs/format.md, "Bits per weight"): the budgets of issue 19's targets in stored
# bits per weight (codes + scales, zeros, tables), so rows are compared at equal size.
SIZE_CLASSES = {"<= 2.25": 2.25, "2.25-3.25": 3.25, "3.25-4.25": 4.25, "> 4.25": math.inf}


def size_class(bits: float) -> str:
    return next(name for name, bound in SIZE_CLASSES.items() if bits <= bound + 1e-9)


def by_size_class(rows: Dict[str, dict]) -> List[Tuple[str, List[str], Optional[str]]]:
    """``(class, row names by ascending stored bits, best row by mean cosine)`` for every size class
    that has rows; rows without quantized layers (FP) or without stored bits (measured before B5
    recorded them: ``unsized_rows``) are left out."""
    classes: Dict[str, List[str]] = {name: [] for name in SIZE_CLASSES}
    for name, row in rows.items():
        if row["kind"] != "fp" and "bits_per_weight" in row:
            classes[size_class(row["bits_per_weight"])].append(name)
    out = []
    for cls, names in classes.items():
        if names:
            names.sort(key=lambda n: (rows[n]["bits_per_weight"], n))
            out.append((cls, names, max(names, key=lambda n: rows[n]["cosine"])))
    return out


def size_frontier(rows: Dict[str, dict]) -> set:
    """Rows no other row beats at equal or smaller size: none has at most their stored bits per weight
    and at least their mean cosine, better in one (FP rows left out)."""
    quantized = {n: (r["bits_per_weight"], r["cosine"]) for n, r in rows.items()
                 if r["kind"] != "fp" and "bits_per_weight" in r}
    return {n for n, (bits, cos) in quantized.items()
            if not any(b <= bits and c >= cos and (b, c) != (bits, cos) for b, c in quantized.values())}


def unsized_rows(rows: Dict[str, dict]) -> List[str]:
    """Quantized rows stored by a run from before B5 recorded stored bits per weight."""
    return [n for n, r in rows.items() if r["kind"] != "fp" and "bits_per_weight" not in r]
