"""GPU timing of the sparse attention kernel's tiles at 128K, keep 0.1 (decode: one token; prefill: 512
question tokens), on the kept positions of a real budget-mode lookup of the synthetic clustered layer of
``sqattn_index.bench`` (CUDA-graph timing, L2 flushed, ``bench.Timer``). Decode rows report GB/s of K/V read
and the share of a device copy; prefill rows TFLOP/s (4 * D flops per query-key pair).

The session-7 run (docs/bench/session7/sparse_variants.txt) also A/B-tested the loop form at commit d96792f
(whole tiles unmasked with the last, partial tile peeled off, against every tile masked): masking every tile
was 12% faster in prefill and equal in decode, so the peeled form was removed.

    python benchmarks/gpu_sparse_variants.py [--shapes llama3-8b,llama2-7b] [--context 131072] [--tokens 1,512]
        [--splits 4,8,16]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...
    from sqattn_index.bench import Timer, copy_bandwidth
    from sqattn_index.kernels import sparse_attention as sa

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--splits", default="", help="decode: also time these split-K factors (comma list) per setting")
    ap.add_argument("--tokens", default="1,512", help="question tokens to time (comma list)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    copy = copy_bandwidth(dev, timer)
    print(f"device {torch.cuda.get_device_name(dev)}; copy {copy:.0f} GB/s; context {a.context}, keep {a.keep}",
          flush=True)
    splits = [None] + [int(x) for x in a.splits.split(",") if x]
    for shape, tokens in itertools.product(a.shapes.split(","), [int(x) for x in a.tokens.split(",")]):
        layer, q, fns = build(shape, a.context, a.keep, tokens, dev)
        _, _, pos, total = fns["budget"][1]()
        d = q.shape[-1]
        kept = int(total.sum())
        grid = [{}]
        if tokens == 1:
            grid += [dict(BLOCK_N=bn, num_stages=st) for bn, st in ((64, 4), (128, 2), (128, 3), (32, 4))]
        else:
            grid += [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)]
        for over, sp in itertools.product(grid, splits if tokens == 1 else [None]):
            ms = timer(lambda: sa.sparse_attention_positions(q, layer.keys, layer.values, pos, total, d ** -0.5,
                                                             config=over, num_splits=sp))
            if tokens == 1:
                gbs = kept * 2 * d * layer.keys.element_size() / (ms * 1e6)
                rate = f"{gbs:6.0f} GB/s ({gbs / copy:.0%} of copy)"
            else:
                rate = f"{kept * (q.shape[1] // layer.keys.shape[0]) * tokens * 4 * d / (ms * 1e9):6.0f} TFLOP/s"
            print(f"{shape} T={tokens} {over or 'default'} splits={sp or 'auto'}: {ms:.4f} ms {rate}", flush=True)
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
