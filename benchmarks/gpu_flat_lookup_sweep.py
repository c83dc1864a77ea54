"""GPU timing of the decode lookup in budget mode, flat (what the engine runs when the coarse budget covers
>= 90% of the keys: keep 0.1 at coarse slack 10) and hierarchical, per launch setting of the flat level.

Synthetic clustered layer of ``sqattn_index.bench`` (16 keys per fine cluster, 16 fine per coarse), one decode
token, CUDA-graph timing with L2 flushed (``bench.Timer``). Prints ms per lookup (positions included) and of
the flat level's normaliser launch alone, first with the default ``kernels.lookup.TUNING``, then for each
(flat_block_c, blocks per program, flat_stages, warps) (a program scores that many blocks of ``flat_block_c``
centroids, its loads pipelined over ``flat_stages`` stages), then for the budget kernel's thresholds per
round (``budget.KWAY``) with the best setting, and the hierarchical lookup at coarse slack 3. The last line per
shape is the best setting as JSON. (A version that also wrote the kept positions inside the budget kernel, one
program per head, was slower: 126 against 94 us at Llama-2-7B 128K; docs/bench/README.md.)

    python benchmarks/gpu_flat_lookup_sweep.py [--context 131072] [--default-only]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


class DecodeCase:
    """One decode token of ``shape`` over the synthetic clustered layer of ``sqattn_index.bench`` (N tokens,
    bf16), with the fine budget of ``keep`` and the lookup's launches: ``flat`` / ``hier`` (whole lookup,
    positions included) and ``lse_only`` (the flat level's normaliser launch). Shared with gpu_budget_sweep."""

    def __init__(self, shape: str, n: int, keep: float, dev: torch.device):
        from sqattn_index.bench import SHAPES, BenchConfig, make_queries, synthetic_layer
        from sqattn_index.kernels.positions import segment_lows

        hq, hk, d = SHAPES[shape]
        self.n, self.hk, self.d = n, hk, d
        self.layer = layer = synthetic_layer(hk, n, d, torch.bfloat16, dev, BenchConfig())
        self.qg = make_queries(layer, hq, 1, seed=1).reshape(1, hk, hq // hk, d)
        self.scale = d ** -0.5
        self.budget = torch.full((1, hk), keep * n - layer.sink - layer.window, device=dev)
        self.kw = dict(seg_lows=segment_lows(layer.fine_offsets, n, layer.window), num_tokens=n,
                       sink_tokens=layer.sink, window_tokens=layer.window, fine_spread=layer.fine_spread,
                       coarse_spread=layer.coarse_spread, always_keys=(layer.keys, layer.sink, layer.window))
        self.base = (self.qg, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
                     layer.coarse_offsets, None, None)

    def flat(self, slack: float = 0.0):
        from sqattn_index.kernels import lookup as lk

        return lk.centroid_lookup_positions(*self.base, self.budget, None, self.scale, False, budget_slack=slack,
                                            **self.kw)

    def hier(self):
        from sqattn_index.kernels import lookup as lk

        coarse = (self.budget * 3).clamp(max=float(self.n))
        return lk.centroid_lookup_positions(*self.base, self.budget, coarse, self.scale, True, **self.kw)

    def lse_only(self):
        from sqattn_index.kernels import lookup as lk

        layer = self.layer
        level = lk._Level(self.qg, layer.fine_centroids, layer.fine_sizes, self.scale, "ieee",
                          spread=layer.fine_spread, flat_fine=True)
        return level.lse(always=self.kw["always_keys"])


def main() -> None:
    from sqattn_index.bench import Timer
    from sqattn_index.kernels import budget as bm
    from sqattn_index.kernels import lookup as lk

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b")
    ap.add_argument("--default-only", action="store_true", help="time only the default TUNING")
    ap.add_argument("--variants", default=None,
                    help='JSON list of TUNING overrides to time against the default instead of the grid (key '
                         '"budget_warps": budget.WARPS, "slack": the search slack); the best is written to --best')
    ap.add_argument("--best", default=None, help="with --variants: write the fastest variant here as JSON")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, 30)
    default = dict(lk.TUNING)
    for shape in args.shapes.split(","):
        case = DecodeCase(shape, args.context, args.keep, dev)
        layer, n, hk, d = case.layer, case.n, case.hk, case.d
        flat, hier, lse_only = case.flat, case.hier, case.lse_only
        cf = layer.fine_centroids.shape[1]
        mb = hk * cf * (d * 2 + 4) / 1e6
        lk.TUNING.update(default)
        print(f"{shape} N={n} flat budget lookup, default TUNING (blocks per program by the program-count rule): "
              f"{timer(flat) * 1e3:6.1f} us; normaliser launch {timer(lse_only) * 1e3:6.1f} us", flush=True)
        if args.default_only:
            continue
        if args.variants is not None:
            timed = []
            for v in [{}] + json.loads(args.variants):
                tuning = {k: x for k, x in v.items() if k not in ("budget_warps", "slack")}
                lk.TUNING.update(default, **tuning)
                bm.WARPS = v.get("budget_warps")
                slack = v.get("slack", 0.0)
                ms = timer(lambda: flat(slack))
                print(f"{shape} N={n} flat budget lookup variant {json.dumps(v)}: {ms * 1e3:6.1f} us; normaliser "
                      f"launch {timer(lse_only) * 1e3:6.1f} us", flush=True)
                timed.append((ms, v))
            lk.TUNING.update(default)
            bm.WARPS = None
            best_v = min(timed, key=lambda r: r[0])[1]
            print(f"{shape} best variant: {json.dumps(best_v)}", flush=True)
            if args.best:
                with open(args.best.replace("SHAPE", shape), "w") as fh:
                    json.dump(best_v, fh)
            continue
        results = []
        for bc, tiles, stages, bw in itertools.product((32, 64), (1, 2, 4, 8), (1, 3), (2, 4)):
            # flat_programs=1 makes the rule give exactly flat_tiles_max blocks per program
            setting = dict(flat_block_c=bc, flat_tiles_max=tiles, flat_programs=1, flat_stages=stages,
                           flat_warps=bw, flat_warps_one_query=bw)
            lk.TUNING.update(default, **setting)
            try:
                ms, lse_ms = timer(flat), timer(lse_only)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{shape} {setting}: {type(exc).__name__}: {exc}", flush=True)
                continue
            results.append((ms, setting))
            print(f"{shape} N={n} flat budget lookup {setting}: {ms * 1e3:6.1f} us; normaliser launch "
                  f"{lse_ms * 1e3:6.1f} us ({mb:.1f} MB of centroids: {mb / (lse_ms * 1e3) * 1e3:.0f} GB/s)",
                  flush=True)
        best = min(results, key=lambda r: r[0])[1]
        lk.TUNING.update(default, **best)
        for kway in (1, 2, 4):
            bm.KWAY = kway
            print(f"{shape} N={n} flat budget lookup (best setting), budget kernel KWAY={kway}: "
                  f"{timer(flat) * 1e3:6.1f} us", flush=True)
        bm.KWAY = 2
        print(f"{shape} N={n} hierarchical budget lookup (coarse slack 3, best setting): "
              f"{timer(hier) * 1e3:.1f} us", flush=True)
        lk.TUNING.update(default)
        print(f"{shape} best: {json.dumps(best)}", flush=True)
        del layer, case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
