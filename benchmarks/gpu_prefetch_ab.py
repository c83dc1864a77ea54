"""GPU A/B of the L2 prefetch of kept K/V issued by the decisions launch (``kernels.decide.PREFETCH``): "none",
"k" (keys) or "kv" (keys and values). The lookup's later launches (positions, then the sparse kernel's start)
leave DRAM mostly idle; with the prefetch the kept rows stream into the L2 meanwhile.

Decode (one new token), threshold selection, flat lookup on the 8-bit centroid tables (the decode rows of the
benchmark table), the synthetic clustered layer (``gpu_prefill_lookup_sweep.build``), keep 10%, CUDA graphs, L2
flushed before each replay (``bench.Timer``; --flush read for a read flush); rounds alternate the modes. Per
context it also checks that the outputs are the same in every mode and prints the dense SDPA time of the
benchmark's fastest backend once, for the ratio.

    python benchmarks/gpu_prefetch_ab.py [--shapes llama3-8b,llama2-7b] [--contexts 32768,131072] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.bench_workload import dense_candidates
    from sqattn_index.kernels import decide

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush", default="write", choices=("write", "read"))
    ap.add_argument("--modes", default="none,k,kv")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps, flush=a.flush)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; keep {a.keep}; flush {a.flush}")
    modes = a.modes.split(",")
    for shape in a.shapes.split(","):
        for n in (int(x) for x in a.contexts.split(",")):
            layer, q, fns = build(shape, n, a.keep, 1, dev, hierarchical=False, fp8=True)
            step, lookup = fns["threshold"]
            dense = min(timer(fn) for fn in dense_candidates(q, layer).values())
            outs = {}
            for m in modes:
                decide.PREFETCH["mode"] = m
                outs[m] = step()[0].clone()
            diff = max(float((outs[m] - outs[modes[0]]).abs().max()) for m in modes)
            log(f"{shape} N={n}: dense {dense:.4f} ms; max |out - out[{modes[0]}]| over the modes {diff:.1e}")
            for r in range(a.rounds):
                res = {}
                for m in modes:
                    decide.PREFETCH["mode"] = m
                    res[m] = timer(step)
                log(f"{shape} N={n} round {r}: " + ", ".join(f"{m} {v * 1000:.1f} us ({dense / v:.2f}x)"
                                                           for m, v in res.items()))
            decide.PREFETCH["mode"] = "none"
            del layer, q, fns, step, lookup
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
