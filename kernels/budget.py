"""Budget selection in Triton (same contract as ``budget_mask_ref``): keep the clusters of highest per-key
probability until at least ``target`` keys are kept, per (question, KV head), without sorting.

One program per (question, KV head) holds the head's clusters in registers and bisects on the
log-probability threshold: the kept key count of
``p >= t`` only falls as ``t`` rises, so the largest ``t`` whose count still reaches the target keeps exactly
the clusters the sort-based reference keeps (the top ones up to and including the cluster that reaches the
target), up to clusters whose probabilities tie within the bisection's resolution (2^-ITERS of the
log-probability range). One launch replaces the reference's sort, cumsum and scatter, and it stays
CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attention import _max, _sum

__all__ = ["budget_mask"]


@triton.jit
def _budget_kernel(P, SIZES, ALLOWED, TARGET, KEEP, s_pb, s_ph, s_sh, s_ab, s_ah, s_tb, s_th, s_kb, s_kh,
                   HK, NC, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (question, KV head); all NC <= BLOCK clusters live in registers for the bisection."""
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = (c < NC) & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
    p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
    sz = tl.where(ok, tl.load(SIZES + h * s_sh + c, mask=ok, other=0).to(tl.float32), 0.0)
    lp = tl.where(ok, tl.log(tl.maximum(p, 1e-30)), float("-inf"))  # (1e-38 would be typed fp64 by Triton)
    target = tl.load(TARGET + b * s_tb + h * s_th)
    # Invariant: count(lp >= lo) >= target, or lo is the smallest allowed lp (then every allowed cluster is
    # kept); count(lp >= hi) < target.
    lo = (-_max(tl.where(ok, -lp, float("-inf")), axis=0)).to(tl.float32)
    hi = (_max(lp, axis=0) + 1.0).to(tl.float32)
    for _ in range(ITERS):
        mid = ((lo + hi) * 0.5).to(tl.float32)
        kept = _sum(tl.where(lp >= mid, sz, 0.0), axis=0)
        take = kept >= target
        lo = tl.where(take, mid, lo).to(tl.float32)
        hi = tl.where(take, hi, mid).to(tl.float32)
    lo = tl.where(target > 0, lo, float("inf")).to(tl.float32)  # a target of 0 keeps nothing
    tl.store(KEEP + b * s_kb + h * s_kh + c, (ok & (lp >= lo)).to(tl.uint8), mask=c < NC)


MAX_CLUSTERS = 16384  # clusters per head held in registers; more fall back to the reference's sort


def budget_mask(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor,
                iters: int = 32) -> torch.Tensor:
    """Keep clusters in descending per-key probability until ``target`` keys are kept.

    probs [B, Hk, C] float32 (>= 0), sizes [Hk, C] int64, allowed [B, Hk, C] bool, target [B, Hk] keys.
    Returns keep [B, Hk, C] bool. Clusters with probability 0 are kept only when the target needs them, as
    in the reference (it ranks them last)."""
    b, hk, c = probs.shape
    if c > MAX_CLUSTERS:
        from .reference import budget_mask_ref

        return budget_mask_ref(probs, sizes, allowed, target)
    probs = probs.float().contiguous()
    allowed_u8 = allowed.to(torch.uint8).contiguous()
    target = target.float().contiguous()
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=probs.device)
    block = triton.next_power_of_2(max(c, 16))
    _budget_kernel[(b * hk,)](
        probs, sizes, allowed_u8, target, keep, probs.stride(0), probs.stride(1), sizes.stride(0),
        allowed_u8.stride(0), allowed_u8.stride(1), target.stride(0), target.stride(1), keep.stride(0),
        keep.stride(1), hk, c, ITERS=iters, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )
    return keep.view(torch.bool)
