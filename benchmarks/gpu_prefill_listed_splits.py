"""GPU A/B of the many-query (prefill) lookup's launch settings for the compacted fine level of a hierarchical
lookup: ``TUNING_MANY["norm_splits_listed"]`` and ``["prob_splits_listed"]`` split its normaliser's centroid list
and its probability launch's queries over more programs. The fine level's probability grid is sized for every
fine cluster the level could list, so its query split (taken from ``prob_programs``) stayed 1 although most of
its blocks are empty; the normaliser has one program per query tile and head (256 at 2048 grouped queries).

512 question tokens, 128K fixed context, keep 10%, the synthetic clustered layer (``gpu_prefill_lookup_sweep.build``),
CUDA graphs, L2 flushed (``bench.Timer``); rounds alternate the settings. Per setting it also counts the fine
clusters whose decision differs from the default's.

    python benchmarks/gpu_prefill_listed_splits.py [--shapes llama3-8b,llama2-7b] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

VARIANTS = {
    "default": {},
    "prob x2": {"prob_splits_listed": 2},
    "prob x4": {"prob_splits_listed": 4},
    "norm x2": {"norm_splits_listed": 2},
    "norm x2 prob x2": {"norm_splits_listed": 2, "prob_splits_listed": 2},
    "norm x2 prob x4": {"norm_splits_listed": 2, "prob_splits_listed": 4},
    "norm 64x64 x2 prob x2": {"norm_block_c": 64, "norm_splits_listed": 2, "prob_splits_listed": 2},
    "norm 2 stages prob x2": {"norm_stages": 2, "prob_splits_listed": 2},
}


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer, profile_step
    from sqattn_index.kernels import lookup_many as lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--modes", default="threshold,budget")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default="", help="a variant name: per-kernel profile of its lookup")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, {a.tokens} question tokens, keep {a.keep}")
    default = dict(lm.TUNING_MANY)

    def use(over):
        lm.TUNING_MANY.clear()
        lm.TUNING_MANY.update(default, **over)

    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, a.tokens, dev)
        for mode in a.modes.split(","):
            step, lookup = fns[mode]
            use({})
            keep0 = lookup()[0].clone()
            for name, over in VARIANTS.items():
                use(over)
                diff = int((lookup()[0] != keep0).sum())
                log(f"{shape} {mode} {name}: fine decisions differing from the default {diff} of {keep0.numel()}")
                if name == a.profile:
                    profile_step(lookup, log)
            for r in range(a.rounds):
                res = []
                for name, over in VARIANTS.items():
                    use(over)
                    res.append(f"{name} {timer(lookup) * 1000:.1f}/{timer(step) * 1000:.1f}")
                log(f"{shape} {mode} round {r} (lookup/step us): " + ", ".join(res))
        use({})
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
