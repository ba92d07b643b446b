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
    # 8 codes fill ``bits`` whole bytes: join each group of 8 into one 64-bit word, split it into bytes
    groups = -(-flat.numel() // 8)
    flat = torch.nn.functional.pad(flat, (0, groups * 8 - flat.numel())).reshape(groups, 8)
    word = (flat << (bits * torch.arange(8, device=flat.device))).sum(dim=1, keepdim=True)
    stream = (word >> (8 * torch.arange(bits, device=flat.device))) & 0xFF
    return stream.reshape(-1)[: packed_size(codes.numel(), bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int64."""
    expected = packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {expected} bytes for {numel} {bits}-bit codes, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    return unpack_stream(packed, bits, numel)


def unpack_stream(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """:func:`unpack_codes` without the checks (deploy mode calls it at every forward).

    For ``bits`` in 1, 2, 4, 8 a byte holds ``8 / bits`` whole codes: shifts on uint8. Otherwise
    ``bits`` bytes hold 8 codes: they are joined into one 64-bit word, then shifted.
    """
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts) & mask
    else:
        words = -(-packed.numel() // bits)
        padded = torch.nn.functional.pad(packed, (0, words * bits - packed.numel())).reshape(words, bits).long()
        word = (padded << (8 * torch.arange(bits, device=packed.device))).sum(dim=1, keepdim=True)
        codes = (word >> (bits * torch.arange(8, device=packed.device))) & mask
    return codes.reshape(-1)[:numel].long()
