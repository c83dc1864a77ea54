"""GPU timing of the decode epilogue (``fused_attention.merge_with_new_tokens``: split-K merge of the fixed
context's partials plus causal attention over the new tokens) at the end-to-end benchmark's shapes, for each
``MERGE_TUNING`` setting; CUDA-graph timing with L2 flushed (``bench.Timer``).

    python benchmarks/gpu_merge_sweep.py
"""

from __future__ import annotations

import itertools

import torch


def main() -> None:
    from sqattn_index.bench import Timer
    from sqattn_index.kernels import fused_attention as fa

    dev = torch.device("cuda")
    timer = Timer(dev, 30)
    default = dict(fa.MERGE_TUNING)
    gen = torch.Generator(device=dev).manual_seed(0)
    for hq, hk, splits in ((32, 32, 9), (32, 8, 33)):
        d, cap, t = 128, 128, 1
        g = hq // hk
        part_o = torch.randn(1, hk, splits, g * t, d, device=dev, generator=gen)
        part_l = torch.randn(1, hk, splits, g * t, device=dev, generator=gen)
        q = torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16, generator=gen)
        nk = torch.randn(1, hk, cap, d, device=dev, dtype=torch.bfloat16, generator=gen)
        nv = torch.randn_like(nk)
        for used in (64, 96):
            slots = torch.tensor([used - 1], device=dev)
            ref = fa.merge_with_new_tokens(part_o, part_l, q, nk, nv, slots, d ** -0.5)[0]
            for bn, w in itertools.product((32, 64, 128), (4, 8)):
                fa.MERGE_TUNING.update(block_n=bn, num_warps=w)
                out = fa.merge_with_new_tokens(part_o, part_l, q, nk, nv, slots, d ** -0.5)[0]
                err = float((out - ref).abs().max())
                ms = timer(lambda: fa.merge_with_new_tokens(part_o, part_l, q, nk, nv, slots, d ** -0.5))
                print(f"Hq {hq} Hk {hk} splits {splits} new tokens {used}: block_n {bn:3d} warps {w}: "
                      f"{ms * 1e3:6.2f} us (max |diff| vs default {err:.1e})", flush=True)
            fa.MERGE_TUNING.update(default)


if __name__ == "__main__":
    main()
