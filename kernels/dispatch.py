"""Backend chooser: the torch references or the Triton kernels behind one set of names."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import reference

__all__ = ["FEW_QUERIES", "get_ops", "triton_available"]

BACKENDS = ("auto", "torch", "triton")
# Grouped queries per KV head up to which a lookup is decode-sized: the Triton lookup's decode launches (more
# go to the many-query path, lookup_many.py) and the 8-bit centroid tables (selection.SelectionSpec.fp8_for).
# Here, in a module without Triton kernels, so the torch-only selection code can import it.
FEW_QUERIES = 16


def triton_available() -> bool:
    """True when a CUDA device is visible and Triton imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def get_ops(backend: str = "auto") -> SimpleNamespace:
    """Ops for ``backend``: "torch" (references), "triton" (kernels) or "auto" (triton on CUDA, else torch).

    Returns a namespace with ``centroid_lookup``, ``always_logz``, ``ranges_from_mask``, ``sparse_attention``,
    ``sparse_attention_with_new_tokens``, ``causal_attention``, ``lse_merge`` (each with the signature of its
    ``*_ref``) and ``backend``, the name actually chosen. ``ranges_from_mask`` and ``causal_attention`` are
    torch in both.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = "triton" if triton_available() else "torch"
    common = dict(ranges_from_mask=reference.ranges_from_mask_ref, causal_attention=reference.causal_attention_ref)
    if backend == "torch":
        return SimpleNamespace(backend="torch", centroid_lookup=reference.centroid_lookup_ref,
                               always_logz=reference.always_logz_ref,
                               sparse_attention=reference.sparse_attention_ref,
                               sparse_attention_with_new_tokens=reference.sparse_attention_with_new_tokens_ref,
                               lse_merge=reference.lse_merge_ref, **common)
    from .always_logz import always_logz
    from .fused_attention import sparse_attention_with_new_tokens
    from .lookup import centroid_lookup
    from .merge import lse_merge
    from .sparse_attention import sparse_attention

    return SimpleNamespace(backend="triton", centroid_lookup=centroid_lookup, always_logz=always_logz,
                           sparse_attention=sparse_attention,
                           sparse_attention_with_new_tokens=sparse_attention_with_new_tokens,
                           lse_merge=lse_merge, **common)
