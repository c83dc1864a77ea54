"""Build-time breakdown (prefill vs clustering vs calibration) of a ~6K-token corpus with the embedded model.

    python benchmarks/cpu_build_breakdown.py [--tokens 6000] [--json docs/build_breakdown.json]

Uses the largest context of tests/data/needle_tasks.jsonl, trimmed or repeated to about --tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.eval.tasks import load_tasks
from sqattn_index.model_loading import load_local_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    local = load_local_model(progress=False)
    engine = SqueezedEngine(local, SqueezeConfig())
    context = max((t.context for t in load_tasks(ROOT / "tests/data/needle_tasks.jsonl")), key=len)
    ids = local.tokenizer(context, add_special_tokens=False)["input_ids"]
    while len(ids) < args.tokens:
        ids = ids + ids
    text = local.tokenizer.decode(ids[: args.tokens])
    runs = []
    for r in range(args.repeats):
        corpus, _ = engine.build_corpus([text])
        runs.append(dict(corpus.build_seconds, tokens=corpus.num_tokens))
        print(f"run {r}: {runs[-1]}")
    best = min(runs, key=lambda x: x["prefill"] + x["clustering"] + x["calibration"])
    result = {
        "tokens": best["tokens"], "prefill_s": best["prefill"], "clustering_s": best["clustering"],
        "calibration_s": best["calibration"], "clustering_over_prefill": best["clustering"] / best["prefill"],
        "runs": runs, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "dtype": str(local.dtype), "config": SqueezeConfig().to_dict(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "config")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
