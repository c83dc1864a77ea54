"""Tensor files of an index: ``corpus.safetensors`` (the fixed token ids) and one
``layer_NNN.safetensors`` per decoder layer (every tensor of ``LayerKV.tensors()`` by field name).

Files are written with ``safetensors.torch.save_file`` and fsynced; their sha256 and byte size go to
the metadata database. Reads verify presence, size and sha256 *before* any tensor is returned, then
memory-map the file with ``safe_open`` on CPU. No pickle, no ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sqattn_index.corpus_kv import LayerKV
from sqattn_index.errors import CorruptIndexError

__all__ = [
    "CORPUS_FILE",
    "FileDigest",
    "layer_file_name",
    "sha256_file",
    "fsync_path",
    "write_tensor_file",
    "verify_file",
    "read_tensor_file",
    "layer_from_tensors",
]

CORPUS_FILE = "corpus.safetensors"
_CHUNK = 1 << 22
_REQUIRED = tuple(n for n in LayerKV.TENSOR_FIELDS if n not in LayerKV.OPTIONAL_FIELDS)


def layer_file_name(layer: int) -> str:
    """``layer_000.safetensors`` for layer 0."""
    return f"layer_{layer:03d}.safetensors"


@dataclass(frozen=True)
class FileDigest:
    """A written file: its name inside the index directory, sha256 hex digest and size in bytes."""

    name: str
    sha256: str
    num_bytes: int


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (makes a rename or a new file durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> FileDigest:
    """Write ``tensors`` (any shapes/dtypes, any device) to ``path`` as safetensors, fsync, hash."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
    fsync_path(path)
    sha, size = sha256_file(path)
    return FileDigest(path.name, sha, size)


def verify_file(path: Path, sha256: str, num_bytes: int) -> None:
    """Raise CorruptIndexError unless ``path`` exists with exactly ``num_bytes`` bytes and ``sha256``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptIndexError(
            f"index file {path} is missing; the index is incomplete. Rebuild the index (persist it again)."
        ) from None
    if size != num_bytes:
        raise CorruptIndexError(
            f"index file {path} has {size} bytes, expected {num_bytes} (truncated or overwritten). "
            "Rebuild the index (persist it again)."
        )
    found, _ = sha256_file(path)
    if found != sha256:
        raise CorruptIndexError(
            f"index file {path} fails its checksum: sha256 {found}, expected {sha256}. "
            "The file is corrupt; rebuild the index (persist it again)."
        )


def read_tensor_file(
    path: Path, sha256: str, num_bytes: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Verify ``path`` (see ``verify_file``), then load every tensor memory-mapped on CPU and move it
    to ``device`` (None: stay on CPU)."""
    verify_file(path, sha256, num_bytes)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # RuntimeError: torch mmap of a vanished file
        raise CorruptIndexError(f"index file {path} is not a readable safetensors file ({exc}); "
                                "rebuild the index.") from None
    if device is not None:
        out = {name: t.to(device) for name, t in out.items()}
    return out


def layer_from_tensors(
    tensors: dict[str, torch.Tensor],
    *,
    path: Path,
    num_kv_heads: int,
    num_tokens: int,
    head_dim: int,
    num_fine: int,
    num_coarse: int,
    dtype: str,
    sink_tokens: int,
    window_tokens: int,
    keep_ladder: tuple[float, ...],
) -> LayerKV:
    """A ``LayerKV`` from the tensors of one layer file, after checking names, shapes and the K/V dtype
    against the database (Hk, N, D, Cf, Cc, L = len(keep_ladder)); CorruptIndexError on a mismatch."""
    hk, n, d, cf, cc, nl = num_kv_heads, num_tokens, head_dim, num_fine, num_coarse, len(keep_ladder)
    expected = {
        "keys": (hk, n, d), "values": (hk, n, d), "perm": (hk, n),
        "fine_centroids": (hk, cf, d), "fine_sizes": (hk, cf), "fine_offsets": (hk, cf + 1),
        "coarse_centroids": (hk, cc, d), "coarse_sizes": (hk, cc), "coarse_offsets": (hk, cc + 1),
        "thresholds": (nl, hk), "coarse_thresholds": (nl, hk), "fine_spread": (hk, cf), "coarse_spread": (hk, cc),
    }
    missing = [name for name in _REQUIRED if name not in tensors]
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise CorruptIndexError(f"index file {path}: missing tensors {missing}, unexpected tensors {unknown}; "
                                f"expected {list(expected)}. Rebuild the index.")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise CorruptIndexError(f"index file {path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                    f"{expected[name]} from the index database. Rebuild the index.")
    for name in ("keys", "values"):
        found = str(tensors[name].dtype).removeprefix("torch.")
        if found != dtype:
            raise CorruptIndexError(f"index file {path}: tensor {name!r} has dtype {found}, expected {dtype} "
                                    "from the index database. Rebuild the index.")
    # Files written before the cluster spreads existed have none: the selection then uses the plain centroid
    # estimate, which is what those indexes' thresholds were calibrated for (SqueezeConfig.from_dict).
    return LayerKV(**tensors, sink_tokens=sink_tokens, window_tokens=window_tokens, keep_ladder=keep_ladder)
