"""Kernels of sqattn_index (installed as ``sqattn_index.kernels``): Triton ops and their torch references.

The Triton modules (``lookup`` with ``lookup_level``, ``lookup_kernels`` and ``lookup_tiles``, ``decide``,
``lookup_many`` and ``compaction``; ``always_logz``, ``budget``, ``sparse_attention`` with ``positions``,
``fused_attention``, ``merge``; ``chain``: programmatic dependent launch between them) are imported lazily through
``get_ops``, so importing this package defines no Triton kernel (``TRITON_INTERPRET`` must be set before kernels
are defined). ``dispatch`` and the references (``reference``, ``reference_lookup``) are torch only.
``centroid_fp8`` (torch only) makes the 8-bit centroid tables the lookups take.
"""

from .centroid_fp8 import dequantize_centroids, quantize_centroids
from .dispatch import get_ops
from .reference import (
    always_logz_ref,
    budget_mask_ref,
    causal_attention_ref,
    centroid_lookup_ref,
    decide_from_logits_ref,
    group_queries_ref,
    lse_merge_ref,
    ranges_from_mask_ref,
    slotted_causal_attention_ref,
    sparse_attention_ref,
    sparse_attention_with_new_tokens_ref,
)

__all__ = [
    "always_logz_ref",
    "budget_mask_ref",
    "causal_attention_ref",
    "get_ops",
    "centroid_lookup_ref",
    "decide_from_logits_ref",
    "dequantize_centroids",
    "group_queries_ref",
    "lse_merge_ref",
    "quantize_centroids",
    "ranges_from_mask_ref",
    "slotted_causal_attention_ref",
    "sparse_attention_ref",
    "sparse_attention_with_new_tokens_ref",
]
