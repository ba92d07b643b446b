"""b-bit packing of integer codes into bytes.

Bit order (docs/format.md): codes are laid end to end in one little-endian bit stream; code ``i``
occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and stream bit ``k`` is bit
``k % 8`` of byte ``k // 8``. The last byte is zero-padded. ``ceil(n * b / 8)`` bytes for ``n`` codes.
"""

from __future__ import annotations

import torch


def packed_size(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.int64)
    return (stream.reshape(-1, 8).to(torch.int64) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int64."""
    expected = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {expected} bytes for {numel} {bits}-bit codes, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int64)
    return (stream.reshape(numel, bits) * weights).sum(dim=1)
