"""Packed codes -> look-up table -> weight: the one decoding routine deploy mode and ONNX export share."""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ..packing import unpack_stream


def lut_decode(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """The weight ``table[g, code]`` of every element, ``shape``; group ``g`` owns a contiguous slice."""
    codes = unpack_stream(packed, bits, math.prod(shape))
    return torch.gather(table, 1, codes.reshape(table.shape[0], -1)).reshape(shape)


def lut_decode_rows(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: Tuple[int, ...],
                    index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (any shape of integers) of the weight ``[rows, cols]`` (``shape``), ``index.shape + (cols,)``:
    only the codes of those rows are unpacked (an embedding look-up). ``table`` has one group or one per row."""
    cols = shape[1]
    flat = index.reshape(-1, 1).long()
    start = (flat * cols + torch.arange(cols, device=packed.device)) * bits  # first stream bit of every code
    byte, shift = start >> 3, start & 7
    # a code spans at most two bytes; the byte after the last one is never needed (its bits are padding)
    word = packed[byte].long() | (packed[(byte + 1).clamp(max=packed.numel() - 1)].long() << 8)
    codes = (word >> shift) & ((1 << bits) - 1)
    group = flat if table.shape[0] > 1 else torch.zeros_like(flat)
    return table[group, codes].reshape(*index.shape, cols)


@torch.library.custom_op("adq_hf::lut_decode", mutates_args=())
def lut_decode_op(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: List[int]) -> torch.Tensor:
    """:func:`lut_decode` as one operator: how ONNX export sees a layer's weight (``_onnx_lut_decode``)."""
    return lut_decode(packed, table, bits, tuple(shape))


@lut_decode_op.register_fake
def _(packed, table, bits, shape):
    return table.new_empty(shape)
