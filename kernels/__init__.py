"""Kernels of sqattn_index (installed as ``sqattn_index.kernels``): Triton ops and their torch references."""

from .reference import (
    causal_attention_ref,
    centroid_lookup_ref,
    group_queries_ref,
    lse_merge_ref,
    ranges_from_mask_ref,
    sparse_attention_ref,
)

__all__ = [
    "causal_attention_ref",
    "centroid_lookup_ref",
    "group_queries_ref",
    "lse_merge_ref",
    "ranges_from_mask_ref",
    "sparse_attention_ref",
]
