"""Storage costs of a ~6K-token SmolLM2 index: disk bytes per corpus token by part, persist and load time.

    python benchmarks/storage_costs.py [--device cpu] [--repeats 3] [--json OUT]

Builds an index (``SqueezedKVIndex.from_documents``) over the largest context of
tests/data/needle_tasks.jsonl with the embedded model, persists it ``--repeats`` times into fresh directories
(``index.storage_context.persist``), then loads it ``--repeats`` times, each in a fresh Python process with
the model already loaded there (``sqattn_index.load_index``, the public path; and the storage layer alone,
``storage.load_index_files``). Times are medians. Disk bytes come from ``sqattn_index.index_info``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from llama_index.core import Document

import sqattn_index as sq
from sqattn_index.eval.tasks import load_tasks
from sqattn_index.index_info import describe_index

ROOT = Path(__file__).resolve().parents[1]

GROUPS = {  # reported group -> parts of describe_index()["disk_bytes"]
    "K/V (keys + values)": ("keys", "values"),
    "cluster index (centroids, sizes, offsets, permutation, thresholds)": (
        "centroids", "cluster_sizes", "offsets", "permutation", "thresholds"),
    "safetensors headers": ("tensor_headers",),
    "corpus token ids": ("corpus_ids",),
    "sqlite metadata (manifest, documents, nodes, layers)": ("sqlite_metadata",),
    "commit marker": ("commit_marker",),
    "LlamaIndex JSON (docstore, index store, graph store)": ("llamaindex_json",),
}

LOADER = """
import json, statistics, sys, time
import torch
import sqattn_index as sq
from sqattn_index.storage import load_index_files
path, device = sys.argv[1], sys.argv[2]
llm = sq.SqueezedLLM.from_pretrained(device=device)
t0 = time.perf_counter()
index = sq.load_index(path, llm=llm)
t1 = time.perf_counter()
local = llm.local
load_index_files(path + "/sqattn_kv", device=local.device, expected_model_fingerprint=local.model_fingerprint(),
                 expected_tokenizer_fingerprint=local.tokenizer_fingerprint())
t2 = time.perf_counter()
print(json.dumps({"load_index_s": t1 - t0, "storage_only_s": t2 - t1,
                  "tokens": index.vector_store.corpus.num_tokens}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    context = max((t.context for t in load_tasks(ROOT / "tests/data/needle_tasks.jsonl")), key=len)
    llm = sq.SqueezedLLM.from_pretrained(device=args.device)
    t0 = time.perf_counter()
    index = sq.SqueezedKVIndex.from_documents([Document(text=context, id_="needle-context")], llm=llm)
    build_s = time.perf_counter() - t0
    corpus = index.vector_store.corpus
    tokens = corpus.num_tokens
    print(f"model {llm.local.model_id} on {llm.local.device} ({str(llm.local.dtype).removeprefix('torch.')}); "
          f"built {tokens} tokens, {len(index.vector_store.node_ids)} nodes in {build_s:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in corpus.build_seconds.items())})", flush=True)

    work = Path(tempfile.mkdtemp(prefix="sqattn_storage_costs_"))
    try:
        persist_s = []
        for r in range(args.repeats):
            target = work / f"index{r}"
            t = time.perf_counter()
            index.storage_context.persist(str(target))
            persist_s.append(time.perf_counter() - t)
        path = work / "index0"
        info = describe_index(path)
        info["fine_per_head"], info["coarse_per_head"] = (info["clusters"]["fine_per_head"][0],
                                                          info["clusters"]["coarse_per_head"][0])
        loads = []
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        for r in range(args.repeats):
            proc = subprocess.run([sys.executable, "-c", LOADER, str(path), args.device], capture_output=True,
                                  text=True, env=env, check=True)
            loads.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            assert loads[-1]["tokens"] == tokens
    finally:
        shutil.rmtree(work, ignore_errors=True)

    disk = info["disk_bytes"]
    total = info["disk_bytes_total"]
    rows = []
    for group, parts in GROUPS.items():
        n = sum(disk.get(p, 0) for p in parts)
        rows.append({"part": group, "bytes": n, "bytes_per_token": n / tokens, "share": n / total})
    kv_bytes = rows[0]["bytes"]
    result = {
        "model": info["model"], "device": str(llm.local.device), "dtype": info["dtype"], "tokens": tokens,
        "nodes": info["nodes"], "layers": info["layers"], "kv_heads": info["kv_heads"], "head_dim": info["head_dim"],
        "clusters": {k: info["clusters"][k] for k in ("fine_total", "coarse_total")},
        "fine_per_head": info["clusters"]["fine_per_head"][0],
        "coarse_per_head": info["clusters"]["coarse_per_head"][0],
        "build_s": build_s, "build_seconds": corpus.build_seconds,
        "disk_bytes_total": total, "disk_bytes_per_token": total / tokens, "overhead_over_kv": total / kv_bytes - 1,
        "parts": rows, "disk_bytes_by_file_part": disk,
        "persist_s_median": statistics.median(persist_s), "persist_s": persist_s,
        "load_index_s_median": statistics.median(l["load_index_s"] for l in loads),
        "storage_load_s_median": statistics.median(l["storage_only_s"] for l in loads), "loads": loads,
        "persist_mb_per_s": total / 2**20 / statistics.median(persist_s),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]},
    }

    print(f"\ndisk: {total} bytes = {total / 2**20:.2f} MiB = {total / tokens:.0f} bytes per corpus token "
          f"({result['overhead_over_kv']:.1%} on top of the K/V itself)")
    print(f"{'part':<68} {'bytes':>12} {'B/token':>10} {'share':>7}")
    for row in rows:
        print(f"{row['part']:<68} {row['bytes']:>12} {row['bytes_per_token']:>10.1f} {row['share']:>7.2%}")
    print(f"\nby tensor / file ({info['fine_per_head']} fine and {info['coarse_per_head']} coarse clusters per layer "
          f"and KV head; K/V in {info['dtype']}, centroids float32, sizes/offsets/permutation int64):")
    for part, n in disk.items():
        print(f"  {part:<20} {n:>12} {n / tokens:>10.1f}")
    print(f"\npersist (index.storage_context.persist, fresh dir): median {result['persist_s_median']:.2f} s "
          f"of {[round(s, 2) for s in persist_s]} ({result['persist_mb_per_s']:.0f} MiB/s)")
    print(f"load in a fresh process (sq.load_index, model already loaded): "
          f"median {result['load_index_s_median']:.2f} s "
          f"of {[round(l['load_index_s'], 2) for l in loads]}")
    print(f"  of which the storage layer alone (load_index_files, verified): median "
          f"{result['storage_load_s_median']:.2f} s of {[round(l['storage_only_s'], 2) for l in loads]}")
    print(f"host: {result['host']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
