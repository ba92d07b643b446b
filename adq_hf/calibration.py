"""Calibration data for one-shot paths (PTQ, calibration at load): batches of model inputs from what
users have at hand -- batches as they are, a list of strings with the model's tokenizer, or a
``datasets.Dataset`` (token columns, or a text column to tokenize)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, List, Optional

import torch

TEXT_COLUMNS = ("text", "sentence", "content")


def calibration_batches(data, tokenizer=None, batch_size: int = 8, max_length: Optional[int] = 512,
                        text_column: Optional[str] = None) -> List:
    """A list of model-input batches from ``data``:

    - a list of strings: tokenised by ``tokenizer`` in batches of ``batch_size`` (padded to the
      batch's longest, truncated to ``max_length``; padding is left out of PTQ's Hessians through the
      attention mask);
    - a ``datasets.Dataset``: its ``input_ids`` (and ``attention_mask``) columns, or its text column
      (``text_column``, else the first of ``text``/``sentence``/``content``) through ``tokenizer``;
    - anything else: an iterable of batches (tensors, ``(inputs, labels)``, dicts), used as it is.
    """
    if _is_dataset(data):
        columns = set(data.column_names)
        if "input_ids" in columns:
            keep = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in columns]
            return [_pad_rows([data[i] for i in range(s, min(s + batch_size, len(data)))], keep, tokenizer)
                    for s in range(0, len(data), batch_size)]
        column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(f"the calibration dataset has no input_ids and no text column (columns: {sorted(columns)}); "
                             "pass text_column= or tokenised data.")
        data = list(data[column])
    if isinstance(data, str):
        raise ValueError("calibration data is a single string: pass a list of strings (one sample each).")
    if isinstance(data, (list, tuple)) and data and all(isinstance(s, str) for s in data):
        if tokenizer is None:
            raise ValueError("calibration data is text: pass the model's tokenizer (tokenizer=AutoTokenizer.from_pretrained(...)).")
        if getattr(tokenizer, "pad_token", "") is None:  # decoder-only tokenizers often have none: padding is masked
            tokenizer.pad_token = tokenizer.eos_token
        return [dict(tokenizer(list(data[s:s + batch_size]), padding=True, truncation=max_length is not None,
                               max_length=max_length, return_tensors="pt"))
                for s in range(0, len(data), batch_size)]
    batches = list(data) if isinstance(data, Iterable) else None
    if not batches:
        raise ValueError("calibration data is empty or not iterable: pass batches of model inputs, a list of "
                         "strings with a tokenizer, or a datasets.Dataset.")
    return batches


def _is_dataset(data) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(data, datasets.Dataset)


def _pad_rows(rows: List[Mapping], keys: List[str], tokenizer) -> dict:
    """Right-pad token rows of unequal length into tensors (pad id from the tokenizer, else 0); the
    attention mask marks the real tokens."""
    longest = max(len(r["input_ids"]) for r in rows)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    batch = {}
    for key in keys:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([list(r[key]) + [fill] * (longest - len(r[key])) for r in rows])
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"]))
                                                for r in rows])
    return batch
