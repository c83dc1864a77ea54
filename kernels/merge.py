"""Log-sum-exp merge of two partial attentions in Triton (same contract as ``lse_merge_ref``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chain import chain_enter, chain_launch

__all__ = ["lse_merge"]


@triton.jit
def _lse_merge_kernel(OA, LA, OB, LB, OUT, LSE, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_R: tl.constexpr, PDL: tl.constexpr = 0):
    chain_enter(PDL)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < n_rows
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    la = tl.load(LA + rows, mask=r_ok, other=float("-inf"))
    lb = tl.load(LB + rows, mask=r_ok, other=float("-inf"))
    hi = tl.maximum(la, lb)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    ea = tl.exp(la - hi_safe)
    eb = tl.exp(lb - hi_safe)
    lse = hi_safe + tl.log(ea + eb)  # -inf when both parts are empty
    safe = tl.where(lse == float("-inf"), 0.0, lse)
    wa = tl.exp(la - safe)
    wb = tl.exp(lb - safe)
    oa = tl.load(OA + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    ob = tl.load(OB + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    out = wa[:, None] * oa + wb[:, None] * ob
    tl.store(OUT + rows[:, None] * D + offs_d[None, :], out, mask=mask)
    tl.store(LSE + rows, lse, mask=r_ok)


def lse_merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax attentions over disjoint key sets.

    Args:
        out_a, out_b: [..., D] float32 normalised partial outputs; lse_a, lse_b: [...] float32 log-sum-exps
        (-inf for an empty part; both empty gives zeros).
    Returns:
        out [..., D] float32, lse [...] float32.
    """
    d = out_a.shape[-1]
    oa, ob = out_a.float().contiguous(), out_b.float().contiguous()
    la, lb = lse_a.float().contiguous(), lse_b.float().contiguous()
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    n_rows = la.numel()
    block_r = 16
    _lse_merge_kernel[(triton.cdiv(max(n_rows, 1), block_r),)](
        oa, la, ob, lb, out, lse, n_rows, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=block_r, num_warps=4,
        **chain_launch(oa.device),
    )
    return out, lse
