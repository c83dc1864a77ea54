"""8-bit (float8 e4m3) centroid tables for the decode lookup.

A decode step's centroid lookup reads every centroid of the level it scores (a flat lookup: every fine
centroid, 1/16 of the keys' bytes). Stored as float8 e4m3 with one scale per (KV head, dimension), the table
is half the bytes of bf16. Each scale is a power of two (each dimension's largest magnitude lands in the top
binade of the format, [224, 448]), so the lookup kernels fold it into the query, ``q.c = (q * scale).table``,
exactly: the product of a 16-bit query and a power of two is another 16-bit number, and an e4m3 value is a
bf16 number, so the native 16-bit dot and the fp32 CUDA-core path both score the dequantised table
``dequantize_centroids(*quantize_centroids(c))`` exactly (up to summation order). The per-dimension scale
keeps the few large key channels (rotary outliers) from flushing the small ones to zero.
"""

from __future__ import annotations

import torch

__all__ = ["FP8", "FP8_MAX", "quantize_centroids", "dequantize_centroids", "is_fp8", "lookup_tables"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == FP8


def quantize_centroids(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hk, C, D] float centroids -> (float8 e4m3 [Hk, C, D], fp32 power-of-two scales [Hk, D]) with
    ``centroids ~= table.float() * scales[:, None, :]`` (relative error at most 2^-4 per entry in the
    format's normal range)."""
    if centroids.dim() != 3 or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a float tensor [Hk, C, D]; got {tuple(centroids.shape)} "
                         f"{centroids.dtype}")
    c = centroids.float()
    amax = c.abs().amax(dim=1)  # [Hk, D]
    capturing = c.is_cuda and torch.cuda.is_current_stream_capturing()  # (the check syncs: not in a capture)
    if not capturing and not torch.isfinite(amax).all():
        raise ValueError("centroids hold inf or NaN: nothing to quantise; rebuild the index's clusters")
    # 2^ceil(log2(amax / 448)): amax / scale in (224, 448]
    scales = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))), torch.ones_like(amax))
    table = (c / scales[:, None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return table.contiguous(), scales.contiguous()


def dequantize_centroids(table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 centroids [Hk, C, D] an 8-bit table stands for (what the kernels score against)."""
    if not is_fp8(table) or scales.shape != (table.shape[0], table.shape[2]):
        raise ValueError(f"expected a float8 e4m3 table [Hk, C, D] and fp32 scales [Hk, D]; got {table.dtype} "
                         f"{tuple(table.shape)} and {tuple(scales.shape)}")
    return table.float() * scales.float()[:, None, :]


def lookup_tables(fine_centroids: torch.Tensor, coarse_centroids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both levels' 8-bit tables as the lookup's keyword arguments (``fine_centroids``, ``coarse_centroids``,
    ``fine_centroid_scales``, ``coarse_centroid_scales``)."""
    f8, fsc = quantize_centroids(fine_centroids)
    c8, csc = quantize_centroids(coarse_centroids)
    return dict(fine_centroids=f8, coarse_centroids=c8, fine_centroid_scales=fsc, coarse_centroid_scales=csc)
