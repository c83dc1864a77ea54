"""Run ``sqattn_index.bench_e2e`` with ``kernels.lookup.TUNING`` overrides (and ``budget.WARPS``) from a JSON
file written by ``gpu_flat_lookup_sweep.py --variants ... --best``: the e2e of a sweep's best setting.

    python benchmarks/gpu_e2e_with_tuning.py BEST.json [bench_e2e args]
"""

import json
import sys

from sqattn_index import bench_e2e
from sqattn_index.kernels import budget, lookup

if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        best = json.load(fh)
    budget.WARPS = best.pop("budget_warps", None)
    best.pop("slack", None)  # the e2e takes --budget-slack
    lookup.TUNING.update(best)
    print(f"TUNING overrides: {best}, budget.WARPS = {budget.WARPS}", flush=True)
    bench_e2e.main(sys.argv[2:])
