"""Budget selection in Triton (same contract as ``budget_mask_ref``): keep the clusters of highest per-key
probability until at least ``target`` keys are kept, per (question, KV head), without sorting.

One program per (question, KV head) holds the head's clusters in registers and searches the
log-probability threshold: the kept key count of ``p >= t`` only falls as ``t`` rises, so the largest ``t``
whose count still reaches the target keeps exactly the clusters the sort-based reference keeps (the top ones
up to and including the cluster that reaches the target), up to clusters whose probabilities tie within the
search's resolution (2^-32 of the log-probability range by default). Each round tests ``KWAY`` thresholds
with one reduction, so the search is 11 dependent rounds instead of 32 halvings (the rounds' reductions
across the program's warps are its latency). One launch replaces the reference's sort, cumsum and scatter,
and it stays CUDA-graph capturable.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .sparse_attention import _max, _sum

__all__ = ["budget_mask"]


@triton.jit
def _budget_kernel(P, SIZES, ALLOWED, TARGET, KEEP, SEGLEN, s_pb, s_ph, s_sh, s_ab, s_ah, s_tb, s_th, s_kb, s_kh,
                   s_eb, s_eh, HK, NC, sink_len, window_len, ITERS: tl.constexpr, KWAY: tl.constexpr,
                   BLOCK: tl.constexpr, HAS_ALLOWED: tl.constexpr, WRITE_SEGLEN: tl.constexpr):
    """One program per (question, KV head); all NC <= BLOCK clusters live in registers for the search.
    Without HAS_ALLOWED every cluster is allowed; with WRITE_SEGLEN it also writes the kept segment lengths
    SEGLEN[b, h, :] = (sink_len, kept size of each cluster, window_len) for ``kept_positions``."""
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    h = (pid % HK).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < NC
    if HAS_ALLOWED:
        ok = ok & (tl.load(ALLOWED + b * s_ab + h * s_ah + c, mask=c < NC, other=0) != 0)
    p = tl.load(P + b * s_pb + h * s_ph + c, mask=ok, other=0.0)
    sz = tl.where(ok, tl.load(SIZES + h * s_sh + c, mask=ok, other=0).to(tl.float32), 0.0)
    lp = tl.where(ok, tl.log(tl.maximum(p, 1e-30)), float("-inf"))  # (1e-38 would be typed fp64 by Triton)
    target = tl.load(TARGET + b * s_tb + h * s_th)
    # Invariant: count(lp >= lo) >= target, or lo is the smallest allowed lp (then every allowed cluster is
    # kept); count(lp >= hi) < target.
    lo = (-_max(tl.where(ok, -lp, float("-inf")), axis=0)).to(tl.float32)
    hi = (_max(lp, axis=0) + 1.0).to(tl.float32)
    # Each round tests KWAY thresholds at once (one reduction of a [KWAY, BLOCK] tile instead of KWAY
    # dependent ones) and keeps the (KWAY + 1)-th of the interval between the last that still reaches the
    # target and the first that does not: ITERS rounds shrink it by (KWAY + 1) ** ITERS.
    frac = (tl.arange(0, KWAY) + 1).to(tl.float32) / (KWAY + 1)
    for _ in range(ITERS):
        cand = lo + (hi - lo) * frac  # [KWAY] increasing thresholds inside (lo, hi)
        kept = _sum(tl.where(lp[None, :] >= cand[:, None], sz[None, :], 0.0), axis=1)  # [KWAY], non-increasing
        take = kept >= target
        n_take = _sum(take.to(tl.int32), axis=0)
        new_lo = _max(tl.where(take, cand, float("-inf")), axis=0)
        new_hi = -_max(tl.where(take, float("-inf"), -cand), axis=0)
        lo = tl.where(n_take > 0, new_lo, lo).to(tl.float32)
        hi = tl.where(n_take < KWAY, new_hi, hi).to(tl.float32)
    lo = tl.where(target > 0, lo, float("inf")).to(tl.float32)  # a target of 0 keeps nothing
    keep = ok & (lp >= lo)
    tl.store(KEEP + b * s_kb + h * s_kh + c, keep.to(tl.uint8), mask=c < NC)
    if WRITE_SEGLEN:
        e_base = SEGLEN + b * s_eb + h * s_eh
        tl.store(e_base + 1 + c, tl.where(keep, sz, 0.0).to(tl.int32), mask=c < NC)
        tl.store(e_base + tl.arange(0, 1), tl.full([1], 0, tl.int32) + sink_len)
        tl.store(e_base + NC + 1 + tl.arange(0, 1), tl.full([1], 0, tl.int32) + window_len)


MAX_CLUSTERS = 16384  # clusters per head held in registers; more fall back to the reference's sort
KWAY = 2  # thresholds tested per round: log2(KWAY + 1) halvings each (H100 sweep: 2 beats 1, 4 and 8;
# benchmarks/gpu_flat_lookup_sweep.py, docs/bench/README.md)


def budget_mask(probs: torch.Tensor, sizes: torch.Tensor, allowed: torch.Tensor | None, target: torch.Tensor,
                iters: int = 32, *, seglen: torch.Tensor | None = None, sink: int = 0, window: int = 0) -> torch.Tensor:
    """Keep clusters in descending per-key probability until ``target`` keys are kept (threshold found to a
    resolution of ``2 ** -iters`` of the log-probability range).

    probs [B, Hk, C] float32 (>= 0), sizes [Hk, C] int64, allowed [B, Hk, C] bool or uint8 (None: all),
    target [B, Hk] keys. Returns keep [B, Hk, C] bool. Clusters with probability 0 are kept only when the
    target needs them, as in the reference (it ranks them last). ``seglen`` [B, Hk, C + 2] int32: also write
    the kept segment lengths there (``sink``, kept cluster sizes, ``window``), as the lookup's positions need."""
    b, hk, c = probs.shape
    if c > MAX_CLUSTERS:
        from .reference import budget_mask_ref

        if allowed is None:
            allowed = torch.ones(b, hk, c, dtype=torch.bool, device=probs.device)
        keep = budget_mask_ref(probs, sizes, allowed.bool(), target)
        if seglen is not None:
            seglen[..., 1:-1] = torch.where(keep, sizes.unsqueeze(0), 0)
            seglen[..., 0], seglen[..., -1] = sink, window
        return keep
    probs = probs.float().contiguous()
    if allowed is not None:
        allowed = (allowed.view(torch.uint8) if allowed.dtype == torch.bool else allowed.to(torch.uint8)).contiguous()
    alw = allowed if allowed is not None else probs
    seg = seglen if seglen is not None else probs
    target = target.float().contiguous()
    keep = torch.empty(b, hk, c, dtype=torch.uint8, device=probs.device)
    block = triton.next_power_of_2(max(c, 16))
    _budget_kernel[(b * hk,)](
        probs, sizes, alw, target, keep, seg, probs.stride(0), probs.stride(1), sizes.stride(0),
        alw.stride(0), alw.stride(1), target.stride(0), target.stride(1), keep.stride(0),
        keep.stride(1), seg.stride(0), seg.stride(1), hk, c, sink, window,
        ITERS=math.ceil(iters / math.log2(KWAY + 1)), KWAY=KWAY, BLOCK=block, HAS_ALLOWED=allowed is not None,
        WRITE_SEGLEN=seglen is not None, num_warps=min(16, max(4, block // 512)),
    )
    return keep.view(torch.bool)
