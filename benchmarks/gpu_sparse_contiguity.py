"""Is the sparse decode kernel limited by where the kept keys lie? One run, Llama-3-8B and Llama-2-7B shapes at
128K, keep 10% (the synthetic layer of ``sqattn_index.bench``, thresholds, flat lookup on 8-bit tables):
the sparse attention kernel alone (``sparse_attention_positions``, split-K partials plus their merge; and
without the merge, ``reduce=False``) over

- the real kept positions (clusters of ~16 keys, scattered),
- the same number of keys per head at contiguous positions (0 .. total),

at the default launch settings and a few others (split factor, keys per tile, warps, stages), against a
device copy of the same bytes. CUDA graphs, L2 flushed by reading (``bench.Timer(flush="read")``).

    python benchmarks/gpu_sparse_contiguity.py [--shapes llama3-8b,llama2-7b] [--context 131072]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench_workload import Timer
    from sqattn_index.kernels import sparse_attention as sa

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=40)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps, flush="read")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    n = a.context
    log(f"device {torch.cuda.get_device_name(dev)}; context {n}, keep {a.keep}; times in ms, read flush")
    for shape in a.shapes.split(","):
        layer, q, by_mode = build(shape, n, a.keep, 1, dev, hierarchical=False, fp8=True)
        _, hq, _, d = q.shape
        hk = layer.keys.shape[0]
        scale = d ** -0.5
        _, _, pos, total = by_mode["threshold"][1]()
        contiguous = torch.arange(pos.shape[-1], dtype=torch.int32, device=dev).expand_as(pos).contiguous()
        kv_bytes = int(total.sum()) * d * 2 * 2
        src = torch.empty(kv_bytes, dtype=torch.uint8, device=dev)
        copy_ms = timer(src.clone)
        log(f"\n{shape}: {int(total.sum()) // hk} kept keys per head, {kv_bytes / 1e6:.1f} MB of K/V; copy of the "
            f"same bytes {copy_ms:.4f} ms ({2 * kv_bytes / (copy_ms * 1e6):.0f} GB/s read + written)")
        nq = hq // hk
        base = sa._config(nq, d, dev)
        auto = sa._auto_splits(hk, n, base["BLOCK_N"], dev)
        settings = [("default", {}, None)]
        for splits in (auto // 2, 2 * auto, 4 * auto):
            settings.append((f"splits {splits}", {}, splits))
        for bn, w, st in ((32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2), (128, 8, 3)):
            settings.append((f"BLOCK_N {bn} warps {w} stages {st}", dict(BLOCK_N=bn, num_warps=w, num_stages=st),
                             None))
            settings.append((f"BLOCK_N {bn} warps {w} stages {st} splits {2 * auto}",
                             dict(BLOCK_N=bn, num_warps=w, num_stages=st), 2 * auto))
        for name, conf, splits in settings:
            res = []
            for p in (pos, contiguous):
                for reduce in (True, False):
                    fn = (lambda p=p, reduce=reduce: sa._attend(q, layer.keys, layer.values, p, total, scale,
                                                                num_splits=splits, config=conf, reduce=reduce))
                    try:
                        res.append(timer(fn))
                    except Exception as exc:  # out of shared memory, ...
                        res.append(float("nan"))
                        log(f"  {name}: {type(exc).__name__}")
            log(f"  {name:40s} kept positions {res[0]:.4f} (no merge {res[1]:.4f}); contiguous {res[2]:.4f} "
                f"(no merge {res[3]:.4f}); GB/s {kv_bytes / (res[0] * 1e6):.0f} / {kv_bytes / (res[2] * 1e6):.0f}")
        del layer, q, src
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
