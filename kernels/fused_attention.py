"""The whole attention of new tokens in one pass after the sparse kernel: fixed context plus new tokens.

``sparse_attention_with_new_tokens`` runs the split-K sparse attention over the kept fixed-context keys
(``sparse_attention._attend``) and then one epilogue kernel per (query row, batch * KV head) that

- merges the split-K partials of the fixed context by log-sum-exp,
- attends the row's query over the new (question + generated) tokens' keys, causally by slot: the query of
  token ``t`` sees buffer entries ``0 .. slots[t]`` (a static buffer, as in CUDA-graph decoding, or the tail
  of a growing cache),
- and writes the merged output in the caller's dtype and layout (e.g. straight into a ``[B, T, Hq, D]``
  buffer seen as ``[B, Hq, T, D]``, the layout Hugging Face's attention returns).

This replaces the torch causal attention over the new tokens, the separate log-sum-exp merge, the split
merge and the dtype/layout copies of a decode step: one launch where there were about a dozen, which is what
a CUDA-graph decode step of a small batch is bound by. New-token keys are few (the question and the answer
so far), so the epilogue scores them on CUDA cores, one query row per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch
from .sparse_attention import _attend, _epilogue_row

__all__ = ["sparse_attention_with_new_tokens", "merge_with_new_tokens"]

# New-token keys per loop step at head_dim 128 (twice as many at 64) and warps of the epilogue launch:
# benchmarks/gpu_merge_sweep.py on an H100 (docs/bench/session8/merge_sweep.txt), 64 keys and 8 warps against
# 32 and 4: 11.0 -> 10.6 us (32 KV heads, 64 new tokens) and 15.0 -> 11.9 us (8 KV heads, 33 splits).
MERGE_TUNING = {"block_n": 64, "num_warps": 8}


@triton.jit
def _merge_new_tokens_kernel(
    PO, PL, Q, NK, NV, SLOTS, OUT, LSE,
    s_pob, s_poh, s_pos, s_pom, s_plb, s_plh, s_pls,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_ob, s_oh, s_ot, s_lb, s_lh, s_lt,
    HK, G, T, NSPLIT, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    """Program (row, b*h): row = g * T + t of KV head h's query group (``group_queries_ref`` order)."""
    chain_enter(PDL)
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    h = (pid_bh % HK).to(tl.int64)
    t = (row % T).to(tl.int64)
    qh = h * G + row // T
    offs_d = tl.arange(0, BLOCK_D)
    _epilogue_row(PO + b * s_pob + h * s_poh + row * s_pom, PL + b * s_plb + h * s_plh + row, s_pos, s_pls, NSPLIT,
                  Q + b * s_qb + qh * s_qh + t * s_qt, NK + b * s_kb + h * s_kh, NV + b * s_vb + h * s_vh, s_kn, s_vn,
                  tl.load(SLOTS + t), OUT + b * s_ob + qh * s_oh + t * s_ot, LSE + b * s_lb + qh * s_lh + t * s_lt,
                  scale, offs_d, offs_d < HEAD_DIM, True, BLOCK_D, BLOCK_S, BLOCK_N)


def _check_new_tokens(q, hk, new_keys, new_values, slots) -> None:
    b, _, t, d = q.shape
    if new_keys.shape[:2] != (b, hk) or new_keys.shape[-1] != d or new_values.shape != new_keys.shape:
        raise ValueError(f"new_keys/new_values must be [B={b}, Hk={hk}, C, D={d}] alike; got "
                         f"{tuple(new_keys.shape)} and {tuple(new_values.shape)}")
    if slots.shape != (t,):
        raise ValueError(f"slots must be [T={t}]; got {tuple(slots.shape)}")


def merge_with_new_tokens(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    q: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S normalised partial attentions of the grouped queries with their causal attention over the new
    tokens, in one launch (the epilogue of ``sparse_attention_with_new_tokens``; also the dense FlashAttention
    baseline's: its output is one partial).

    Args:
        part_out: [B, Hk, S, G*T, D] any float dtype, any strides but a contiguous last dim (rows in
            ``group_queries_ref`` order); part_lse: [B, Hk, S, G*T] float32 natural-log (-inf: empty).
        q: [B, Hq, T, D]; new_keys, new_values: [B, Hk, C, D]; slots: [T]; out: as in
            ``sparse_attention_with_new_tokens``.
    Returns:
        out [B, Hq, T, D], lse [B, Hq, T] float32.
    """
    b, hq, t, d = q.shape
    hk = part_out.shape[1]
    _check_new_tokens(q, hk, new_keys, new_values, slots)
    nq = (hq // hk) * t
    if part_out.dim() != 5 or (part_out.shape[0], part_out.shape[3], part_out.shape[4]) != (b, nq, d):
        raise ValueError(f"part_out must be [B={b}, Hk={hk}, S, G*T={nq}, D={d}]; got {tuple(part_out.shape)}")
    if out is None:
        out = torch.empty(b, hq, t, d, dtype=torch.float32, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, Hq, T, D] = {tuple(q.shape)} with a contiguous last dim; "
                         f"got {tuple(out.shape)} with strides {out.stride()}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    new_keys = new_keys if new_keys.stride(-1) == 1 else new_keys.contiguous()
    new_values = new_values if new_values.stride(-1) == 1 else new_values.contiguous()
    splits = part_out.shape[2]
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    _merge_new_tokens_kernel[(nq, b * hk)](
        part_out, part_lse, q, new_keys, new_values, slots, out, lse,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_out.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        new_keys.stride(0), new_keys.stride(1), new_keys.stride(2),
        new_values.stride(0), new_values.stride(1), new_values.stride(2),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        hk, hq // hk, t, splits, scale,
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=min(triton.next_power_of_2(splits), 64),
        BLOCK_N=MERGE_TUNING["block_n"] if d > 64 else 2 * MERGE_TUNING["block_n"],
        num_warps=MERGE_TUNING["num_warps"], **chain_launch(q.device),
    )
    return out, lse


def sparse_attention_with_new_tokens(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    total: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    slots: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T new tokens over the kept fixed-context keys and, causally, the new tokens (Triton; same
    arguments and results as ``sparse_attention_with_new_tokens_ref``).

    Args:
        q: [B, Hq, T, D]; keys, values: [Hk, N, D] fixed context (sorted order, last dim contiguous).
        pos: [B, Hk, >= max total] int32 sorted kept positions; total: [B, Hk] int32 kept keys per head
            (``lookup.centroid_lookup_positions``).
        new_keys, new_values: [B, Hk, C, D] the new tokens' K/V (a static buffer of capacity C, or a growing
            cache's M tokens); slots: [T] int64, query t sees entries 0 .. slots[t] (slots[t] < C).
        out: optional [B, Hq, T, D] output of any float dtype and strides (e.g. a transposed view of a
            [B, T, Hq, D] buffer); written in place and returned.
    Returns:
        out [B, Hq, T, D] (float32 unless ``out`` is given), lse [B, Hq, T] float32 (over both parts).
    """
    _check_new_tokens(q, keys.shape[0], new_keys, new_values, slots)  # before the sparse kernel runs
    q = q if q.is_contiguous() else q.contiguous()
    part_o, part_l = _attend(q, keys, values, pos, total, scale, num_splits, reduce=False)
    return merge_with_new_tokens(part_o, part_l, q, new_keys, new_values, slots, scale, out=out)
