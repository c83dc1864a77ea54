"""Sparse FlashAttention over the kept ranges of the clustered fixed context (decode and prefill).

One kernel serves both phases. The queries of a KV head are its whole group, flattened to ``Q = G * T`` rows
(``group_queries_ref`` order), so one load of a K/V tile serves every query head of the group. Work is split
over the *kept* keys (split-K): kept key ``i`` of a (batch, KV head) is the i-th key of the concatenated kept
ranges, and an expansion kernel first writes its sorted position ``pos[b, h, i]`` (int32, 4 bytes per key
against ``4 * D`` bytes of K and V read), so the attention kernel gathers whole rows of K/V whatever the
range sizes are. Program ``(m, s, b*h)`` attends query block ``m`` over the s-th of ``S`` equal chunks of the
kept keys and writes a partial (out, lse); a second kernel merges the ``S`` partials by log-sum-exp.

Nothing here reads a device value on the host: every call is CUDA-graph capturable.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .reference import check_scale as _check_scale  # positive scale: the running max is kept in raw q.k units

__all__ = ["sparse_attention", "sparse_attention_positions"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------- kernels


# Reductions and scans through tl.reduce / tl.associative_scan: Triton's jit-decorated standard library
# (tl.sum, tl.max, tl.cdiv, tl.zeros, ...) cannot run under the interpreter when Triton was imported before
# TRITON_INTERPRET was set (pytest conftests often import it); these can. Passing Triton's own combine
# functions keeps the interpreter on its fast numpy paths.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maxc(a, b):
    return tl.maximum(a, b)


_sum_combine = getattr(tl.standard, "_sum_combine", None) or _add
_max_combine = getattr(tl.standard, "_elementwise_max", None) or _maxc


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max_combine)


@triton.jit
def _cumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, _sum_combine)


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, n_ok, d_ok, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr):
    """One online-softmax step of a query tile over one tile of gathered keys (``n_ok``: the real ones). The
    running max ``m_i`` is kept in raw q.k units (qk_scale > 0, and it carries log2(e)), so the scale folds
    into the exponent's one fused multiply-add per pair. IEEE: float32 products in full float32 (Triton's
    default for float32 dots is TF32)."""
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    s = tl.where(n_ok[None, :], qk, float("-inf"))  # [BLOCK_M, BLOCK_N] raw q.k
    m_new = tl.maximum(m_i, _max(s, axis=1))
    m_scaled = tl.where(m_new == float("-inf"), 0.0, m_new) * qk_scale
    alpha = tl.exp2(m_i * qk_scale - m_scaled)
    p = tl.exp2(s * qk_scale - m_scaled[:, None])
    l_i = l_i * alpha + _sum(p, axis=1)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _sparse_attn_kernel(
    Q, K, V, POS, TOTAL, OUT, LSE,
    s_qb, s_qh, s_qm,
    s_kh, s_kn, s_vh, s_vn,
    s_pb, s_ph, s_tb, s_th,
    s_ob, s_oh, s_os, s_om,
    s_lb, s_lh, s_ls,
    HK, NQ, NSPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr = False,
    PDL: tl.constexpr = 0,
):
    """Program (m, s, b*h): query rows block m against the s-th chunk of the kept keys -> partial (out, lse)."""
    chain_enter(PDL)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    total = tl.load(TOTAL + b * s_tb + h * s_th)
    chunk = ((total + NSPLIT - 1) // NSPLIT + 15) // 16 * 16
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, total)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + h * s_kh
    v_base = V + h * s_vh
    pos_base = POS + b * s_pb + h * s_ph

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    pos_next = tl.load(pos_base + lo + offs_n, mask=lo + offs_n < hi, other=0)
    # Every tile is masked: peeling the last, partial tile off (whole tiles unmasked) was 12% slower in
    # prefill on an H100 (the pipelined loop is what matters; docs/bench/session7/sparse_variants.txt).
    for start in range(lo, hi, BLOCK_N):
        pos = pos_next.to(tl.int64)
        # the next tile's positions load now, so its K/V gathers need not wait for them
        nxt = start + BLOCK_N + offs_n
        pos_next = tl.load(pos_base + nxt, mask=nxt < hi, other=0)
        m_i, l_i, acc = _attend_tile(q, k_base + pos[:, None] * s_kn + offs_d[None, :],
                                     v_base + pos[:, None] * s_vn + offs_d[None, :], start + offs_n < hi, d_ok,
                                     m_i, l_i, acc, qk_scale, UPCAST, IEEE)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i * qk_scale + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptr = OUT + b * s_ob + h * s_oh + pid_s * s_os + offs_m[:, None] * s_om + offs_d[None, :]
    tl.store(o_ptr, out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * s_lb + h * s_lh + pid_s * s_ls + offs_m, lse, mask=m_ok)


@triton.jit
def _merge_splits(po_row, pl_row, s_pos, s_pls, NSPLIT, offs_d, d_ok, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Online log-sum-exp over the NSPLIT normalised partials of one query row (po_row: its output row of
    split 0, pl_row: its lse of split 0) -> running max m [1], denominator den [1], accumulator acc [BLOCK_D]
    (fp32; more terms may be merged into them before out = acc / den, lse = m + log den)."""
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full([1], float("-inf"), tl.float32)
    den = tl.full([1], 0.0, tl.float32)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for s0 in range(0, NSPLIT, BLOCK_S):
        ss = s0 + offs_s
        s_ok = ss < NSPLIT
        part_lse = tl.load(pl_row + ss * s_pls, mask=s_ok, other=float("-inf"))
        m_split = tl.maximum(m, _max(part_lse, axis=0))
        m_split_safe = tl.where(m_split == float("-inf"), 0.0, m_split)
        w = tl.exp(part_lse - m_split_safe)  # [BLOCK_S], 0 for empty splits
        o = tl.load(po_row + ss[:, None] * s_pos + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        o = tl.where((w > 0.0)[:, None], o, 0.0)
        alpha = tl.exp(m - m_split_safe)
        den = den * alpha + _sum(w, axis=0)
        acc = acc * alpha + _sum(w[:, None] * o, axis=0)
        m = m_split
    return m, den, acc


@triton.jit
def _epilogue_row(PO_row, PL_row, s_pos, s_pls, NSPLIT, q_row, NK_base, NV_base, s_kn, s_vn, slot, OUT_row, LSE_row,
                  scale, offs_d, d_ok, HAS_NEW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """One query row's output: its NSPLIT fixed-context partials merged by log-sum-exp and, with HAS_NEW, its
    causal attention over the new tokens 0 .. slot (keys/values at NK_base/NV_base, query q_row, natural
    scale); out (cast to OUT_row's dtype) and lse (natural log; -inf where nothing is attended) stored."""
    m, den, acc = _merge_splits(PO_row, PL_row, s_pos, s_pls, NSPLIT, offs_d, d_ok, BLOCK_D, BLOCK_S)
    if HAS_NEW:
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(0, slot + 1, BLOCK_N):
            nn = n0 + offs_n
            n_ok = nn <= slot
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(NK_base + nn[:, None].to(tl.int64) * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(NV_base + nn[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            logits = tl.where(n_ok, _sum(k.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, _max(logits, axis=0))
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(logits - m_new_safe)
            beta = tl.exp(m - m_new_safe)
            den = den * beta + _sum(p, axis=0)
            acc = acc * beta + _sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
    has = den > 0.0
    den_safe = tl.where(has, den, 1.0)
    tl.store(OUT_row + offs_d, (acc / den_safe).to(OUT_row.dtype.element_ty), mask=d_ok)
    tl.store(LSE_row + tl.arange(0, 1), tl.where(has, m + tl.log(den_safe), float("-inf")))


@triton.jit
def _split_reduce_kernel(
    PO, PL, OUT, LSE,
    s_pob, s_poh, s_pos, s_pom,
    s_plb, s_plh, s_pls,
    s_ob, s_oh, s_om, s_lb, s_lh,
    HK, NSPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Merge the NSPLIT partial (out, lse) of one query row by log-sum-exp."""
    chain_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    _epilogue_row(PO + b * s_pob + h * s_poh + row * s_pom, PL + b * s_plb + h * s_plh + row, s_pos, s_pls, NSPLIT,
                  PO, PO, PO, 0, 0, 0, OUT + b * s_ob + h * s_oh + row * s_om, LSE + b * s_lb + h * s_lh + row, 1.0,
                  offs_d, offs_d < HEAD_DIM, False, BLOCK_D, BLOCK_S, 16)


# ----------------------------------------------------------------------------------------------- host side


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _config(nq: int, d: int, device: torch.device) -> dict:
    """Tile shapes and launch settings for ``nq`` query rows per KV head and head dim ``d``."""
    if _interpret() or device.type != "cuda":
        return dict(BLOCK_M=16 if nq <= 16 else 32, BLOCK_N=16, num_warps=4, num_stages=1)
    if nq <= 16:  # decode: one tile of the group's queries, memory bound (2 stages: 1.5-2% faster than 3 at
        # 128K / 10% on an H100, docs/bench/session8/sparse_sweep_decode.txt)
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)
    if nq <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if d > 64 and torch.cuda.get_device_capability(device)[0] >= 9:  # Hopper: 228 KB of shared memory
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 if d <= 64 else 2)


def _auto_splits(programs: int, max_keys: int, block_n: int, device: torch.device, decode: bool = True) -> int:
    """Split-K factor: decode gives every multiprocessor two programs; prefill splits only when its query
    tiles leave most multiprocessors idle (the merge of the partials costs more than a ragged last wave)."""
    sms = _num_sms(device)
    if not decode and programs >= sms // 2:
        return 1
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(max_keys, block_n)))


def _attend(q, keys, values, pos, total, scale, num_splits=None, block_n=None, config=None, reduce=True):
    """Attention of q over the keys at ``pos[b, h, :total[b, h]]``; see ``sparse_attention``. With
    ``reduce=False`` it returns the split-K partials instead: out [B, Hk, S, G*T, D] and lse [B, Hk, S, G*T]
    (normalised per split; S may be 1), for an epilogue that merges them itself."""
    b, hq, t, d = q.shape
    hk, n, _ = keys.shape
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    _check_scale(scale)
    nq = (hq // hk) * t
    dev = q.device
    q = q if q.is_contiguous() else q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    qg = q.view(b, hk, nq, d)
    cfg = _config(nq, d, dev)
    cfg.update(config or {})
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    n_m = triton.cdiv(nq, cfg["BLOCK_M"])
    splits = num_splits or _auto_splits(n_m * b * hk, n, cfg["BLOCK_N"], dev, decode=n_m == 1)
    out = torch.empty(b, hq, t, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=dev)
    if splits == 1:  # the one partial is the output
        part_o, part_l = out.view(b, hk, 1, nq, d), lse.view(b, hk, 1, nq)
    else:
        part_o = torch.empty(b, hk, splits, nq, d, dtype=torch.float32, device=dev)
        part_l = torch.empty(b, hk, splits, nq, dtype=torch.float32, device=dev)
    upcast = _interpret() or q.dtype != keys.dtype or keys.dtype != values.dtype
    # float32 products in full float32, as torch multiplies them unless TF32 is allowed (16-bit inputs: exact)
    ieee = (upcast or keys.dtype == torch.float32) and not torch.backends.cuda.matmul.allow_tf32
    grid = (n_m, splits, b * hk)
    _sparse_attn_kernel[grid](
        qg, keys, values, pos, total, part_o, part_l,
        qg.stride(0), qg.stride(1), qg.stride(2),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        pos.stride(0), pos.stride(1), total.stride(0), total.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_l.stride(0), part_l.stride(1), part_l.stride(2),
        hk, nq, splits, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        UPCAST=upcast, IEEE=ieee, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **chain_launch(qg.device),
    )
    if not reduce:
        return part_o, part_l
    if splits > 1:
        reduce_splits(part_o, part_l, out, lse)
    return out, lse


def reduce_splits(part_o: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge split-K partials out [B, Hk, S, G*T, D], lse [B, Hk, S, G*T] (normalised per split, -inf where a
    split kept nothing) by log-sum-exp into out [B, Hq, T, D] and lse [B, Hq, T] (float32, contiguous)."""
    b, hk, splits, nq, d = part_o.shape
    out3, lse3 = out.view(b, hk, nq, d), lse.view(b, hk, nq)
    _split_reduce_kernel[(nq, b * hk)](
        part_o, part_l, out3, lse3,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_l.stride(0), part_l.stride(1), part_l.stride(2),
        out3.stride(0), out3.stride(1), out3.stride(2), lse3.stride(0), lse3.stride(1),
        hk, splits, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_S=min(triton.next_power_of_2(splits), 128), num_warps=4, **chain_launch(part_o.device),
    )


def sparse_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of every query token over the kept fixed-context ranges (Triton; see
    ``sparse_attention_ref``, same arguments and results).

    Args:
        q: [B, Hq, T, D] bf16/fp16/fp32; keys, values: [Hk, N, D] sorted order (last dim contiguous);
        starts, ends: [B, Hk, R] int64 sorted, non-overlapping [start, end) ranges; counts: [B, Hk] int64,
            entries at index >= count are ignored.
        scale: softmax scale (> 0).
        num_splits: split-K factor (default: enough programs for the device); block_n: keys per tile.
    Returns:
        out: [B, Hq, T, D] float32 (zeros where nothing is kept); lse: [B, Hq, T] float32 (-inf there).
    """
    _check_scale(scale)
    b, hk, r = starts.shape
    n = keys.shape[1]
    if r == 0:
        starts = torch.zeros(b, hk, 1, dtype=torch.int64, device=q.device)
        ends, r = starts, 1
    valid = torch.arange(r, device=starts.device) < counts.unsqueeze(-1)
    lens = torch.where(valid, ends - starts, 0)
    cum = torch.cumsum(lens, dim=-1, dtype=torch.int32)  # [B, Hk, R]
    from .positions import expand_positions  # (positions imports this module's reduction helpers)

    pos = expand_positions(cum, starts.to(torch.int32), n)
    return _attend(q, keys, values, pos, cum[..., -1], scale, num_splits, block_n)


def sparse_attention_positions(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    total: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the keys at sorted positions ``pos[b, h, :total[b, h]]`` (no host sync).

    Args:
        q: [B, Hq, T, D]; keys, values: [Hk, N, D].
        pos: [B, Hk, >= max total] int32 sorted positions of the kept keys, e.g. from
            ``lookup.centroid_lookup_positions``; total: [B, Hk] int32 kept keys per head.
        config: overrides of the launch settings (BLOCK_M, BLOCK_N, num_warps, num_stages), for tuning.
    Returns:
        out [B, Hq, T, D] float32, lse [B, Hq, T] float32, as ``sparse_attention``.
    """
    return _attend(q, keys, values, pos, total, scale, num_splits, block_n, config)
