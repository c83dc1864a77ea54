"""What a persisted index holds and what it costs on disk, read without loading any tensor data.

    info = describe_index("storage/")     # dict: model, tokens, documents, nodes, clusters, disk bytes per part, ...

Disk bytes are split by *part* (from the safetensors headers, exact to the byte):

    keys, values        fixed-context K/V, sorted by cluster            (layer_*.safetensors)
    centroids           fine + coarse centroids
    cluster_sizes       keys per fine / coarse cluster
    offsets             fine / coarse cluster ranges
    permutation         original position of every sorted key
    thresholds          calibrated thresholds per keep fraction
    tensor_headers      safetensors JSON headers
    corpus_ids          the fixed context's token ids                   (corpus.safetensors)
    sqlite_metadata     manifest, documents, nodes, layer rows          (index.sqlite)
    commit_marker       index.commit
    llamaindex_json     docstore / index store / graph store JSON next to the KV folder
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

__all__ = ["describe_index", "safetensors_layout", "PARTS"]

_TENSOR_PART = {
    "keys": "keys", "values": "values", "fine_centroids": "centroids", "coarse_centroids": "centroids",
    "fine_sizes": "cluster_sizes", "coarse_sizes": "cluster_sizes", "fine_offsets": "offsets",
    "coarse_offsets": "offsets", "perm": "permutation", "thresholds": "thresholds",
    "coarse_thresholds": "thresholds", "input_ids": "corpus_ids",
}
PARTS = ("keys", "values", "centroids", "cluster_sizes", "offsets", "permutation", "thresholds", "tensor_headers",
         "corpus_ids", "sqlite_metadata", "commit_marker", "llamaindex_json", "other")


def safetensors_layout(path: str | os.PathLike) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "nbytes"}}`` of a safetensors file, plus ``"__header__": {"nbytes"}``;
    reads only the header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    out = {"__header__": {"nbytes": 8 + size}}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = {"dtype": meta["dtype"], "shape": list(meta["shape"]), "nbytes": end - start}
    return out


def _add(parts: dict, part: str, nbytes: int) -> None:
    parts[part] = parts.get(part, 0) + int(nbytes)


def describe_index(directory: str | os.PathLike) -> dict:
    """Model, sizes, clusters per level, keep ladder, build seconds and disk bytes per part of the index at
    ``directory`` (a LlamaIndex persist dir or a bare KV index dir); CorruptIndexError when there is none."""
    from .storage import load_index_records
    from .storage.tensor_files import CORPUS_FILE
    from .vector_store import resolve_kv_dir

    root = Path(directory)
    kv = resolve_kv_dir(root)
    manifest, documents, nodes = load_index_records(kv)
    parts: dict[str, int] = {}
    fine, coarse = [], []
    for path in sorted(kv.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            layout = safetensors_layout(path)
            _add(parts, "tensor_headers", layout.pop("__header__")["nbytes"])
            for name, meta in layout.items():
                _add(parts, _TENSOR_PART.get(name, "other"), meta["nbytes"])
            if path.name != CORPUS_FILE and "fine_centroids" in layout:
                fine.append(layout["fine_centroids"]["shape"][1])
                coarse.append(layout["coarse_centroids"]["shape"][1])
        elif path.name == "index.sqlite":
            _add(parts, "sqlite_metadata", path.stat().st_size)
        elif path.name == "index.commit":
            _add(parts, "commit_marker", path.stat().st_size)
        else:
            _add(parts, "other", path.stat().st_size)
    if kv != root:
        for path in sorted(root.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                _add(parts, "llamaindex_json" if path.suffix == ".json" else "other", path.stat().st_size)
    disk = {p: parts[p] for p in PARTS if p in parts}
    build = dict(manifest.extra.get("build_seconds") or {})
    return {
        "path": str(root), "kv_dir": str(kv), "model": manifest.model_id, "format_version": manifest.format_version,
        "created_at": manifest.created_at, "tokens": manifest.num_tokens, "documents": len(documents),
        "nodes": len(nodes), "layers": manifest.num_layers, "kv_heads": manifest.num_kv_heads,
        "head_dim": manifest.head_dim, "dtype": manifest.dtype, "sink_tokens": manifest.sink_tokens,
        "window_tokens": manifest.window_tokens, "keep_ladder": list(manifest.keep_ladder),
        "clusters": {"fine_per_head": fine, "coarse_per_head": coarse,
                     "fine_total": sum(fine) * manifest.num_kv_heads,
                     "coarse_total": sum(coarse) * manifest.num_kv_heads},
        "disk_bytes": disk, "disk_bytes_total": sum(disk.values()),
        "build_seconds": {k: float(v) for k, v in build.items() if k != "reclustered"},
        "build_seconds_total": float(sum(v for k, v in build.items() if k in ("prefill", "clustering", "calibration"))),
    }
