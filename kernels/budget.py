"""Budget selection in Triton (same contract as ``budget_mask_ref``): keep the clusters of highest per-key
probability until at least ``target`` keys are kept, per (question, KV head), without sorting.

One program per (question, KV head) bisects on the log-probability threshold: the kept key count of
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
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    target = tl.load(TARGET + b * s_tb + h * s_th)
    # Range of log-probabilities over the allowed clusters (p > 0), and the total allowed size.
    lo = tl.full([], float("inf"), tl.float32)
    hi = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for c0 in range(0, NC, BLOCK):
        c = c0 + offs
        ok = (c < NC) & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
        p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
        sz = tl.load(SIZES + h * s_sh + c, mask=ok, other=0).to(tl.float32)
        lp = tl.log(tl.maximum(p, 1e-30))  # (a literal below fp32's normal range would be typed fp64)
        lo = tl.minimum(lo, -_max(tl.where(ok, -lp, float("-inf")), axis=0)).to(tl.float32)
        hi = tl.maximum(hi, _max(tl.where(ok, lp, float("-inf")), axis=0)).to(tl.float32)
        total = (total + _sum(tl.where(ok, sz, 0.0), axis=0)).to(tl.float32)
    # Invariant: count(lp >= lo) >= target (or lo is the minimum: keep every allowed cluster);
    # count(lp >= hi') < target for hi' = hi + margin.
    hi = (hi + 1.0).to(tl.float32)
    for _ in range(ITERS):
        mid = ((lo + hi) * 0.5).to(tl.float32)
        kept = tl.full([], 0.0, tl.float32)
        for c0 in range(0, NC, BLOCK):
            c = c0 + offs
            ok = (c < NC) & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
            p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
            sz = tl.load(SIZES + h * s_sh + c, mask=ok, other=0).to(tl.float32)
            lp = tl.log(tl.maximum(p, 1e-30))
            kept = (kept + _sum(tl.where(ok & (lp >= mid), sz, 0.0), axis=0)).to(tl.float32)
        take = kept >= target
        lo = tl.where(take, mid, lo).to(tl.float32)
        hi = tl.where(take, hi, mid).to(tl.float32)
    lo = tl.where(target > 0, lo, float("inf")).to(tl.float32)  # a target of 0 keeps nothing
    for c0 in range(0, NC, BLOCK):
        c = c0 + offs
        ok = (c < NC) & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
        p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
        lp = tl.log(tl.maximum(p, 1e-30))
        keep = ok & (lp >= lo)
        tl.store(KEEP + b * s_kb + h * s_kh + c, keep.to(tl.uint8), mask=c < NC)


def budget_mask(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor,
                iters: int = 32) -> torch.Tensor:
    """Keep clusters in descending per-key probability until ``target`` keys are kept.

    probs [B, Hk, C] float32 (>= 0), sizes [Hk, C] int64, allowed [B, Hk, C] bool, target [B, Hk] keys.
    Returns keep [B, Hk, C] bool. Clusters with probability 0 are kept only when the target needs them, as
    in the reference (it ranks them last)."""
    b, hk, c = probs.shape
    probs = probs.float().contiguous()
    allowed_u8 = allowed.to(torch.uint8).contiguous()
    target = target.float().contiguous()
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=probs.device)
    block = min(1024, triton.next_power_of_2(max(c, 16)))
    _budget_kernel[(b * hk,)](
        probs, sizes, allowed_u8, target, keep, probs.stride(0), probs.stride(1), sizes.stride(0),
        allowed_u8.stride(0), allowed_u8.stride(1), target.stride(0), target.stride(1), keep.stride(0),
        keep.stride(1), hk, c, ITERS=iters, BLOCK=block, num_warps=4,
    )
    return keep.view(torch.bool)
