"""GPU timing of the budget search's thresholds per round (``budget.KWAY``), as whole lookups at 128K, keep 0.1,
budget mode (CUDA-graph timing, L2 flushed, ``bench.Timer``): decode hierarchical and flat (the engine's decode
above ``FLAT_ABOVE``) and prefill (512 question tokens), on the synthetic clustered layer of
``sqattn_index.bench``.

The session-7 run (docs/bench/session7/budget_rounds.txt) was made at commit 8853b5e, which also had a
variant of the rounds (KWAY independent scalar reductions with scalar bookkeeping, instead of one [KWAY, BLOCK]
reduction and small reductions over its results): the two were within 1-3% of each other everywhere, so the
variant was removed (the rounds are not what the launch spends its time on).

    python benchmarks/gpu_budget_rounds.py [--shapes llama3-8b,llama2-7b]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...
    from sqattn_index.bench import Timer
    from sqattn_index.kernels import budget as budget_mod

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    print(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, keep 0.1, budget mode", flush=True)
    for shape, (tokens, hier) in itertools.product(a.shapes.split(","), ((1, True), (1, False), (512, True))):
        _, _, fns = build(shape, a.context, 0.1, tokens, dev, hierarchical=hier)
        step, lookup = fns["budget"]
        ref_keep = None
        for kway in (2, 4, 8):
            budget_mod.KWAY = kway
            keep = lookup()[0]
            same = ref_keep is None or torch.equal(keep, ref_keep)
            ref_keep = keep if ref_keep is None else ref_keep
            print(f"{shape} T={tokens} {'hier' if hier else 'flat'} kway={kway}: "
                  f"lookup {timer(lookup):.4f} ms, step {timer(step):.4f} ms, same selection {same}", flush=True)
        budget_mod.KWAY = 2
        del fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
