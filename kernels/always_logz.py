"""Exact log-normaliser of the always-attended keys in Triton (same contract as ``always_logz_ref``).

The lookup's estimate divides by Z_q = sum over clusters of n_c exp(l_c) plus the exact
sum_k exp(s q.k) over the sinks and the observation window. This kernel computes that second term for every
grouped query in one launch: grid (B * Hk, query blocks), each program walks the S + W keys of its head in
blocks of ``BLOCK_K`` with an online logsumexp. No host sync (CUDA-graph capturable).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .sparse_attention import _max, _sum

__all__ = ["always_logz"]


@triton.jit
def _always_logz_kernel(
    Q, K, OUT, s_qb, s_qh, s_qm, s_kh, s_kn, s_ob, s_oh,
    HK, NQ, N, SINK, WINDOW, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    chain_enter(PDL)
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < NQ
    d_ok = offs_d < HEAD_DIM
    qv = tl.load(Q + b * s_qb + h * s_qh + offs_q[:, None] * s_qm + offs_d[None, :],
                 mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s = tl.full([BLOCK_Q], 0.0, tl.float32)
    total = SINK + WINDOW
    for k0 in range(0, total, BLOCK_K):
        i = k0 + tl.arange(0, BLOCK_K)
        k_ok = i < total
        pos = tl.where(i < SINK, i, N - WINDOW + (i - SINK))  # sinks, then the window's sorted positions
        kv = tl.load(K + h * s_kh + pos[:, None].to(tl.int64) * s_kn + offs_d[None, :],
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        logits = _sum(qv[:, None, :] * kv[None, :, :], axis=2) * scale  # [BLOCK_Q, BLOCK_K]
        logits = tl.where(k_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, _max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + _sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(OUT + b * s_ob + h * s_oh + offs_q, m_safe + tl.log(s), mask=q_ok)


def always_logz(q: torch.Tensor, keys: torch.Tensor, sink_tokens: int, window_tokens: int, scale: float
                ) -> torch.Tensor:
    """log sum_k exp(s q.k) over the first ``sink_tokens`` and last ``window_tokens`` sorted keys.

    q [B, Hk, Q, D] grouped queries, keys [Hk, N, D] (any float dtypes) -> [B, Hk, Q] float32 (-inf if none).
    """
    b, hk, nq, d = q.shape
    n = keys.shape[1]
    sink = min(sink_tokens, n)
    window = min(window_tokens, n - sink)
    out = torch.empty(b, hk, nq, dtype=torch.float32, device=q.device)
    if sink + window == 0:
        return out.fill_(float("-inf"))
    q = q if q.stride(-1) == 1 else q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block_q = 16 if nq > 8 or interpret else max(2, triton.next_power_of_2(nq))
    block_k = 16
    grid = (b * hk, triton.cdiv(nq, block_q))
    _always_logz_kernel[grid](
        q, keys, out, q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1),
        out.stride(0), out.stride(1), hk, nq, n, sink, window, scale,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_Q=block_q, BLOCK_K=block_k,
        num_warps=4, **chain_launch(q.device),
    )
    return out
