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


@torch.library.custom_op("adq_hf::lut_decode", mutates_args=())
def lut_decode_op(packed: torch.Tensor, table: torch.Tensor, bits: int, shape: List[int]) -> torch.Tensor:
    """:func:`lut_decode` as one operator: how ONNX export sees a layer's weight (``_onnx_lut_decode``)."""
    return lut_decode(packed, table, bits, tuple(shape))


@lut_decode_op.register_fake
def _(packed, table, bits, shape):
    return table.new_empty(shape)
