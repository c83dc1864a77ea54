"""Persist and load a squeezed KV index: ``CorpusKV`` tensors + manifest, documents and nodes.

Directory layout of a committed index::

    DIR/index.commit              commit marker: format version, generation uid, sha256 of the database
                                  (and of its rows), itself checksummed
    DIR/index.sqlite              metadata database (absent when ``db_url`` points elsewhere);
                                  its rows hold the sha256 and size of every tensor file
    DIR/corpus.safetensors        input_ids [N] int64, the fixed context's token ids
    DIR/layer_000.safetensors     one file per decoder layer: every tensor of ``LayerKV.tensors()``

Writes are atomic and crash-safe, a second concurrent writer gets ``IndexLockedError``, and readers
never block; the protocol (temporary sibling directory, fsync, rename, recovery) is described in
``sqattn_index.storage.atomic``. Loads verify the format version, the model and tokenizer fingerprints
(when expected ones are given) and the presence, size and sha256 of every file before returning tensors.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from sqlalchemy.exc import SQLAlchemyError
from tqdm.auto import tqdm

from sqattn_index.corpus_kv import CorpusKV, LayerKV
from sqattn_index.errors import ConfigError, CorruptIndexError, IncompatibleModelError, SqattnError

from .atomic import (COMMIT_FILE, IndexPaths, crash_point, generation_changed, read_commit, recover_locked,
                     resolve_for_read, swap_in, write_commit, writer_lock)
from .metadata_db import (DB_FILE, GenerationRows, LayerInfo, delete_stale_generations, external_engine,
                          local_reader_engine, local_writer_engine, masked_url, read_generation, write_generation)
from .records import FORMAT_VERSION, DocumentRecord, IndexManifest, NodeRecord, json_normalized
from .tensor_files import (CORPUS_FILE, fsync_path, layer_file_name, layer_from_tensors, read_tensor_file,
                           sha256_file, verify_file, write_tensor_file)

__all__ = ["persist_index", "load_index_files", "load_index_records", "index_exists", "recover_index",
           "KVStoreFiles"]

_LOAD_ATTEMPTS = 20  # a load restarts when a writer swapped the directory under it


# ----------------------------------------------------------------------------------------------- persist


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_corpus(corpus: CorpusKV, m: IndexManifest) -> None:
    """ConfigError unless the manifest's shape fields describe ``corpus``."""
    def expect(what: str, expected, found) -> None:
        if expected != found:
            raise ConfigError(f"manifest {what} is {expected!r} but the corpus has {found!r}; build the manifest "
                              "with storage.manifest_from_corpus(corpus, ...) so they agree.")

    expect("num_layers", m.num_layers, corpus.num_layers)
    expect("num_tokens", m.num_tokens, corpus.num_tokens)
    expect("keep_ladder", tuple(m.keep_ladder), tuple(float(k) for k in corpus.keep_ladder))
    for i, layer in enumerate(corpus.layers):
        layer.check()
        expect(f"num_kv_heads (layer {i})", m.num_kv_heads, layer.num_kv_heads)
        expect(f"head_dim (layer {i})", m.head_dim, layer.head_dim)
        expect(f"num_tokens (layer {i})", m.num_tokens, layer.num_tokens)
        expect(f"sink_tokens (layer {i})", m.sink_tokens, layer.sink_tokens)
        expect(f"window_tokens (layer {i})", m.window_tokens, layer.window_tokens)
        expect(f"dtype (layer {i} keys/values)", m.dtype, _dtype_name(layer.keys))
        for name in ("thresholds", "coarse_thresholds"):
            t = getattr(layer, name)
            if t is not None:
                expect(f"keep ladder length (layer {i} {name} rows)", len(m.keep_ladder), t.shape[0])


def _prepared_records(corpus, manifest, documents, nodes):
    """Validated, JSON-normalised copies of what gets written (as a later load returns it)."""
    _check_corpus(corpus, manifest)
    extra = dict(manifest.extra, build_seconds=dict(corpus.build_seconds))
    manifest = replace(manifest, format_version=FORMAT_VERSION,
                       config=json_normalized(manifest.config, "manifest.config"),
                       layout=json_normalized(manifest.layout, "manifest.layout"),
                       extra=json_normalized(extra, "manifest.extra"))
    documents = [replace(d, metadata=json_normalized(d.metadata, f"metadata of document {d.ref_doc_id!r}"))
                 for d in documents]
    nodes = [replace(n, metadata=json_normalized(n.metadata, f"metadata of node {n.node_id!r}")) for n in nodes]
    for what, keys in (("document ref_doc_id", [d.ref_doc_id for d in documents]),
                       ("node node_id", [n.node_id for n in nodes]), ("node position", [n.position for n in nodes])):
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1}, key=str)[:5]
            raise ConfigError(f"every {what} must be unique within an index; duplicates: {dup}.")
    return manifest, documents, nodes


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a directory that holds something other than an index."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory; choose another index directory.")
    names = set(os.listdir(target))
    if names and not names & {COMMIT_FILE, DB_FILE, CORPUS_FILE}:
        raise ConfigError(f"{target} exists and is not a sqattn index (found {sorted(names)[:5]}); refusing to "
                          "replace it. Choose an empty or new directory.")


def _thresholds_json(layer: LayerKV) -> list:
    out = []
    for row, keep in enumerate(layer.keep_ladder):
        entry = {"keep": float(keep)}
        for key, t in (("fine", layer.thresholds), ("coarse", layer.coarse_thresholds)):
            if t is not None:
                entry[key] = t[row].float().cpu().tolist()
        out.append(entry)
    return out


def persist_index(
    directory: str | os.PathLike,
    corpus: CorpusKV,
    manifest: IndexManifest,
    documents: list[DocumentRecord],
    nodes: list[NodeRecord],
    *,
    db_url: str | None = None,
    progress: bool = False,
) -> IndexManifest:
    """Write ``corpus`` (tensors), ``manifest``, ``documents`` and ``nodes`` as the index at ``directory``,
    atomically replacing any index there. Returns the manifest as written (``format_version`` set,
    ``extra["build_seconds"]`` = ``corpus.build_seconds``, JSON-normalised dicts).

    ``db_url``: SQLAlchemy URL of an external metadata database (default: ``DIR/index.sqlite``).
    Raises IndexLockedError when another writer holds the index, ConfigError when the manifest does
    not describe the corpus or ``directory`` holds something else.
    """
    paths = IndexPaths(directory)
    manifest, documents, nodes = _prepared_records(corpus, manifest, documents, nodes)
    with writer_lock(paths):
        crash_point("locked")
        recover_locked(paths)
        _check_replaceable(paths.target)
        paths.new.mkdir()
        try:
            uid = _write_generation(paths, corpus, manifest, documents, nodes, db_url, progress)
        except BaseException:
            shutil.rmtree(paths.new, ignore_errors=True)  # never swapped in; a crash leaves it to the next writer
            raise
        swap_in(paths, uid)
        if db_url is not None:
            engine = external_engine(db_url)
            try:
                delete_stale_generations(engine, paths.target, uid)
            finally:
                engine.dispose()
    return manifest


def _write_generation(paths: IndexPaths, corpus, manifest, documents, nodes, db_url, progress) -> str:
    """Write every file of a new generation into ``paths.new``, commit marker last; return its uid."""
    new = paths.new
    crash_point("tmp_created")
    corpus_file = write_tensor_file(new / CORPUS_FILE, {"input_ids": corpus.input_ids})
    layers = []
    for i, layer in enumerate(tqdm(corpus.layers, desc="persist layers", disable=not progress)):
        digest = write_tensor_file(new / layer_file_name(i), layer.tensors())
        layers.append(LayerInfo(i, digest, layer.num_fine, layer.num_coarse, _thresholds_json(layer)))
        crash_point(f"layer_{i}_written")
    rows = GenerationRows(uuid.uuid4().hex, manifest, documents, nodes, corpus_file, layers)
    engine = external_engine(db_url) if db_url is not None else local_writer_engine(new / DB_FILE)
    try:
        write_generation(engine, rows, paths.target)
    finally:
        engine.dispose()
    commit = {"format_version": FORMAT_VERSION, "index_uid": rows.uid, "rows_sha256": rows.sha256()}
    if db_url is None:
        fsync_path(new / DB_FILE)
        sha, size = sha256_file(new / DB_FILE)
        commit["db"] = {"file": DB_FILE, "sha256": sha, "num_bytes": size}
    else:
        commit["db"] = {"url": masked_url(db_url)}
    crash_point("db_written")
    write_commit(new, commit)
    crash_point("committed")
    return rows.uid


# ------------------------------------------------------------------------------------------------- load


def _read_rows(directory: Path, commit: dict, db_url: str | None) -> GenerationRows:
    """Verify the database against the commit marker and read this generation's rows."""
    db = commit.get("db")
    if not isinstance(db, dict) or not isinstance(commit.get("index_uid"), str) or (
            "file" in db and not {"sha256", "num_bytes"} <= set(db)):
        raise CorruptIndexError(f"index file {directory / COMMIT_FILE} lacks its database entry; rebuild the index.")
    if "file" in db:
        if db_url is not None:
            raise ConfigError(f"index at {directory} keeps its metadata in {db['file']}; do not pass db_url.")
        path = directory / db["file"]
        verify_file(path, db["sha256"], db["num_bytes"])
        engine, where = local_reader_engine(path), str(path)
    else:
        if db_url is None:
            raise ConfigError(f"index at {directory} keeps its metadata in an external database ({db.get('url')}); "
                              "pass db_url= with that database's URL.")
        engine, where = external_engine(db_url), masked_url(db_url)
    try:
        rows = read_generation(engine, commit["index_uid"])
    except (SQLAlchemyError, ValueError, TypeError) as exc:  # ValueError: undecodable JSON column
        raise CorruptIndexError(f"index database {where} cannot be read ({type(exc).__name__}: {exc}); "
                                "rebuild the index.") from None
    finally:
        engine.dispose()
    if rows is None:
        raise CorruptIndexError(f"index database {where} has no rows for generation {commit['index_uid']} named "
                                f"by {directory / COMMIT_FILE}; rebuild the index.")
    if rows.sha256() != commit.get("rows_sha256"):
        raise CorruptIndexError(f"index database {where}: rows of generation {rows.uid} fail their checksum "
                                f"recorded in {directory / COMMIT_FILE}; rebuild the index.")
    return rows


def _check_fingerprints(directory: Path, m: IndexManifest, model: str | None, tokenizer: str | None) -> None:
    for field, expected, found in (("model_fingerprint", model, m.model_fingerprint),
                                   ("tokenizer_fingerprint", tokenizer, m.tokenizer_fingerprint)):
        if expected is not None and expected != found:
            raise IncompatibleModelError(
                f"index at {directory} was built with {field} {found!r} (model {m.model_id!r}); expected "
                f"{expected!r}. Rebuild the index with this model or load it with the model it was built with.")


def _load_generation(directory: Path, db_url, device, fingerprints, progress, with_tensors):
    commit = read_commit(directory)
    rows = _read_rows(directory, commit, db_url)
    m = rows.manifest
    _check_fingerprints(directory, m, *fingerprints)
    if not with_tensors:
        return None, m, rows.documents, rows.nodes
    if [info.layer for info in rows.layers] != list(range(m.num_layers)):
        raise CorruptIndexError(f"index database of {directory} lists layers {[i.layer for i in rows.layers]}, "
                                f"expected 0..{m.num_layers - 1}; rebuild the index.")
    cf = rows.corpus_file
    ids = read_tensor_file(directory / cf.name, cf.sha256, cf.num_bytes).get("input_ids")
    if ids is None or tuple(ids.shape) != (m.num_tokens,):
        raise CorruptIndexError(f"index file {directory / cf.name}: expected input_ids of shape ({m.num_tokens},), "
                                f"found {None if ids is None else tuple(ids.shape)}; rebuild the index.")
    layers = []
    for info in tqdm(rows.layers, desc="load layers", disable=not progress):
        path = directory / info.file.name
        tensors = read_tensor_file(path, info.file.sha256, info.file.num_bytes, device)
        layers.append(layer_from_tensors(
            tensors, path=path, num_kv_heads=m.num_kv_heads, num_tokens=m.num_tokens, head_dim=m.head_dim,
            num_fine=info.num_fine, num_coarse=info.num_coarse, dtype=m.dtype, sink_tokens=m.sink_tokens,
            window_tokens=m.window_tokens, keep_ladder=m.keep_ladder))
    corpus = CorpusKV(ids, layers, m.keep_ladder, dict(m.extra.get("build_seconds", {})))
    return corpus, m, rows.documents, rows.nodes


def _load(directory, db_url, device, fingerprints, progress, with_tensors):
    paths = IndexPaths(directory)
    for _ in range(_LOAD_ATTEMPTS):
        found = resolve_for_read(paths)
        if found is None:
            raise CorruptIndexError(f"no sqattn index at {paths.target} (directory missing); "
                                    "persist an index there first or check the path.")
        path, ident = found
        try:
            return _load_generation(path, db_url, device, fingerprints, progress, with_tensors)
        except (SqattnError, OSError):
            if not generation_changed(path, ident):
                raise
            # a writer swapped in a new generation while we read: start over with it
    raise CorruptIndexError(f"index at {paths.target} was replaced {_LOAD_ATTEMPTS} times while loading; "
                            "try again when writers are idle.")


def load_index_files(
    directory: str | os.PathLike,
    device: torch.device | str | None = None,
    load_on_cpu: bool = False,
    expected_model_fingerprint: str | None = None,
    expected_tokenizer_fingerprint: str | None = None,
    *,
    db_url: str | None = None,
    progress: bool = False,
) -> tuple[CorpusKV, IndexManifest, list[DocumentRecord], list[NodeRecord]]:
    """Load the index at ``directory``: ``(corpus, manifest, documents, nodes)``.

    Layer tensors are memory-mapped on CPU and moved to ``device`` (None or ``load_on_cpu=True``: stay
    on CPU); ``corpus.input_ids`` [N] int64 stays on CPU. Every file is verified (presence, size,
    sha256) before its tensors are returned. Raises IndexFormatError (unsupported format version),
    IncompatibleModelError (fingerprint differs from an expected one), CorruptIndexError (missing,
    truncated or corrupt file or database, or no index at ``directory``).
    """
    device = None if load_on_cpu else device
    fingerprints = (expected_model_fingerprint, expected_tokenizer_fingerprint)
    return _load(directory, db_url, device, fingerprints, progress, with_tensors=True)


def load_index_records(
    directory: str | os.PathLike,
    expected_model_fingerprint: str | None = None,
    expected_tokenizer_fingerprint: str | None = None,
    *,
    db_url: str | None = None,
) -> tuple[IndexManifest, list[DocumentRecord], list[NodeRecord]]:
    """``(manifest, documents, nodes)`` of the index at ``directory``, verified, without reading tensors."""
    _, m, docs, nodes = _load(directory, db_url, None, (expected_model_fingerprint, expected_tokenizer_fingerprint),
                              False, with_tensors=False)
    return m, docs, nodes


def index_exists(directory: str | os.PathLike) -> bool:
    """True when ``directory`` (or a crashed swap of it) holds a committed index (files not verified)."""
    return resolve_for_read(IndexPaths(directory)) is not None


def recover_index(directory: str | os.PathLike) -> None:
    """Take the writer lock, finish or roll back a crashed persist and delete its leftovers.
    IndexLockedError when a writer is busy (it recovers by itself)."""
    paths = IndexPaths(directory)
    with writer_lock(paths):
        recover_locked(paths)


@dataclass
class KVStoreFiles:
    """The files of one index directory (``db_url``: optional external metadata database)."""

    directory: str | os.PathLike
    db_url: str | None = None

    def persist(self, corpus: CorpusKV, manifest: IndexManifest, documents: list[DocumentRecord],
                nodes: list[NodeRecord], progress: bool = False) -> IndexManifest:
        return persist_index(self.directory, corpus, manifest, documents, nodes, db_url=self.db_url,
                             progress=progress)

    def load(self, device=None, load_on_cpu: bool = False, expected_model_fingerprint: str | None = None,
             expected_tokenizer_fingerprint: str | None = None, progress: bool = False):
        return load_index_files(self.directory, device, load_on_cpu, expected_model_fingerprint,
                                expected_tokenizer_fingerprint, db_url=self.db_url, progress=progress)

    def load_records(self, expected_model_fingerprint: str | None = None,
                     expected_tokenizer_fingerprint: str | None = None):
        return load_index_records(self.directory, expected_model_fingerprint, expected_tokenizer_fingerprint,
                                  db_url=self.db_url)

    def exists(self) -> bool:
        return index_exists(self.directory)

    def recover(self) -> None:
        recover_index(self.directory)
