"""8-bit (float8 e4m3) centroid tables for the decode lookup.

A decode step's centroid lookup reads every centroid of the level it scores (a flat lookup: every fine
centroid, 1/16 of the keys' bytes). Stored as float8 e4m3 with one fp32 scale per (KV head, dimension), the
table is half the bytes of bf16; the lookup kernels load the 8-bit values, convert them to fp32 and multiply
by the scale row (``lookup_kernels._dequant``), so the scores are those of the dequantised table
``dequantize_centroids(*quantize_centroids(c))`` in fp32. The per-dimension scale keeps the few large key
channels (rotary outliers) from flushing the small ones to zero: each dimension's largest magnitude maps to
the format's largest finite value.
"""

from __future__ import annotations

import torch

__all__ = ["FP8", "FP8_MAX", "quantize_centroids", "dequantize_centroids", "is_fp8"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == FP8


def quantize_centroids(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hk, C, D] float centroids -> (float8 e4m3 [Hk, C, D], fp32 scales [Hk, D]) with
    ``centroids ~= table.float() * scales[:, None, :]`` (relative error about 2^-4 per entry)."""
    if centroids.dim() != 3 or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a float tensor [Hk, C, D]; got {tuple(centroids.shape)} "
                         f"{centroids.dtype}")
    c = centroids.float()
    amax = c.abs().amax(dim=1)  # [Hk, D]
    if not torch.isfinite(amax).all():
        raise ValueError("centroids hold inf or NaN: nothing to quantise; rebuild the index's clusters")
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    table = (c / scales[:, None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return table.contiguous(), scales.contiguous()


def dequantize_centroids(table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 centroids [Hk, C, D] an 8-bit table stands for (what the kernels score against)."""
    if not is_fp8(table) or scales.shape != (table.shape[0], table.shape[2]):
        raise ValueError(f"expected a float8 e4m3 table [Hk, C, D] and fp32 scales [Hk, D]; got {table.dtype} "
                         f"{tuple(table.shape)} and {tuple(scales.shape)}")
    return table.float() * scales.float()[:, None, :]
