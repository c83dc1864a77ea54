"""Persistence of ``SqueezedKVStore`` (``vector_store.py``): where a KV index lives inside a LlamaIndex persist
dir, reading one persisted generation back (tensors and records together, checked against the model) and
writing one atomically from a snapshot, through ``sqattn_index.storage`` (SQLite + safetensors).

``StorePersistence`` holds the store's persistence methods; it adds no fields and works on the store's
private state (``_state``, ``_source``, ``_persisted``, ``_llm``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

from .config import SqueezeConfig
from .engine import SqueezedEngine
from .errors import ConfigError, CorruptIndexError, IncompatibleModelError
from .prompt_layout import DEFAULT_INSTRUCTIONS, PromptLayout
from .store_state import NodeEntry, StoreSnapshot

__all__ = ["KV_DIRNAME", "PERSIST_TOKEN_KEY", "QUERY_TIME_SETTINGS", "StorePersistence", "entries_of",
           "resolve_kv_dir"]

KV_DIRNAME = "sqattn_kv"  # the KV index's folder inside a LlamaIndex persist dir
PERSIST_TOKEN_KEY = "persist_token"  # manifest.extra key: id of the persist that wrote this generation
QUERY_TIME_SETTINGS = ("backend", "centroid_precision")  # a loaded index takes these from its LLM's config


def resolve_kv_dir(directory: str | os.PathLike) -> Path:
    """The KV index folder of ``directory``: ``directory/sqattn_kv`` (a LlamaIndex persist dir) or
    ``directory`` itself (a bare KV index). CorruptIndexError when neither holds one."""
    from .storage import index_exists
    from .storage.atomic import COMMIT_FILE

    path = Path(directory)
    kv = path / KV_DIRNAME
    if any(p.exists() for p in (kv, path / f".{KV_DIRNAME}.old", path / f".{KV_DIRNAME}.new")) and index_exists(kv):
        return kv
    if (path / COMMIT_FILE).is_file() or (not path.exists() and index_exists(path)):  # the latter: mid-swap
        return path
    if not path.exists():
        raise CorruptIndexError(f"no sqattn index at {path}: the directory does not exist; build one with "
                                "`sqattn build DOCS -o DIR` or check the path.")
    raise CorruptIndexError(f"no sqattn KV index under {path} (looked for {kv} and {path / COMMIT_FILE}); "
                            "persist an index there first or check the path.")


def record_node(rec) -> TextNode:
    """The LlamaIndex node of a stored node record (its document as the SOURCE relationship)."""
    rel = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=rec.ref_doc_id)} if rec.ref_doc_id else {}
    return TextNode(id_=rec.node_id, text=rec.text, metadata=dict(rec.metadata), relationships=rel)


def entries_of(records) -> list[NodeEntry]:
    """Store entries (node, text, token span) of stored node records, in corpus order."""
    return [NodeEntry(record_node(r), r.text, (r.token_start, r.token_end))
            for r in sorted(records, key=lambda r: r.position)]


class StorePersistence:
    """Load and persist methods of ``SqueezedKVStore``."""

    def _load_corpus(self, llm: Any) -> None:
        """Read one persisted generation (tensors and records together) and make it the state."""
        from .storage import load_index_files

        directory = self._source[0]
        local = llm.local
        corpus, manifest, _, records = load_index_files(
            directory, device=local.device, expected_model_fingerprint=local.model_fingerprint(),
            expected_tokenizer_fingerprint=local.tokenizer_fingerprint())
        config = dict(manifest.config or {})
        for key in QUERY_TIME_SETTINGS:  # how this process runs the index, not how it was built
            config[key] = getattr(llm.config, key)
        layout = manifest.layout or {}
        engine = SqueezedEngine(local, SqueezeConfig.from_dict(config), layout.get("instructions",
                                                                                    DEFAULT_INSTRUCTIONS))
        if "question_prefix" in layout and layout["question_prefix"] != engine.layout.question_prefix:
            engine.layout = PromptLayout(local.tokenizer, engine.layout.instructions, layout["question_prefix"])
        for key in ("kind", "node_separator"):
            if key in layout and layout[key] != engine.layout.settings()[key]:
                raise IncompatibleModelError(f"index at {directory} uses prompt layout {key}={layout[key]!r}; "
                                             f"this code renders {engine.layout.settings()[key]!r}. Rebuild it.")
        # the records of this very generation (a writer may have replaced the one listed at open time)
        self._state = self._state.replace(engine=engine, corpus=corpus, entries=entries_of(records))
        self._source = None
        token = (manifest.extra or {}).get(PERSIST_TOKEN_KEY)
        self._persisted = (str(Path(directory).resolve()), token, self._state.version)

    @staticmethod
    def _records(entries: Sequence[NodeEntry]):
        from .storage import DocumentRecord, NodeRecord

        nodes, docs = [], {}
        for pos, e in enumerate(entries):
            ref = e.node.ref_doc_id
            nodes.append(NodeRecord(e.node.node_id, ref, e.text, dict(e.node.metadata), e.span[0], e.span[1], pos))
            if ref is not None:
                doc = docs.setdefault(ref, [dict(e.node.metadata), hashlib.sha256(), e.span[0], e.span[1]])
                doc[1].update(e.text.encode())
                doc[3] = e.span[1]
        documents = [DocumentRecord(ref, meta, h.hexdigest(), s, t) for ref, (meta, h, s, t) in docs.items()]
        return documents, nodes

    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Write the KV index next to ``persist_path`` (the LlamaIndex file name), into ``<its folder>/sqattn_kv``."""
        if fs is not None and "file" not in (getattr(fs, "protocol", None) or ()):
            raise ConfigError(f"SqueezedKVStore persists to the local filesystem only; got fs={type(fs).__name__}.")
        self.persist_to(Path(persist_path).parent / KV_DIRNAME)

    def _unchanged_at(self, directory: Path, snap: StoreSnapshot) -> str | None:
        """The persist token of ``directory`` when it already holds exactly ``snap`` (nothing to write)."""
        from .storage import load_index_records

        done = self._persisted
        if done is None or done[1] is None or done[2] != snap.version or done[0] != str(directory.resolve()):
            return None
        try:
            manifest, _, _ = load_index_records(directory)
        except (OSError, ValueError):  # missing, corrupt, other format: write it again
            return None
        return done[1] if (manifest.extra or {}).get(PERSIST_TOKEN_KEY) == done[1] else None

    def persist_to(self, directory: str | os.PathLike, progress: bool = False, token: str | None = None) -> str:
        """Write the KV index (SQLite metadata + safetensors) atomically into ``directory``, from one snapshot.

        ``token`` (default: a fresh uuid) is recorded as the generation's persist token; returns the token
        of the generation now at ``directory`` (the previous one when it already held this exact state)."""
        from .storage import manifest_from_corpus, persist_index

        directory = Path(directory)
        source, snap = self._source, self.snapshot()
        if source is not None:
            if Path(source[0]).resolve() == directory.resolve():
                return source[1]  # unchanged since it was read from there
            raise ConfigError("attach a SqueezedLLM (SqueezedKVIndex(..., llm=llm)) before persisting a loaded store "
                              "elsewhere.")
        unchanged = self._unchanged_at(directory, snap)
        if unchanged is not None:
            return unchanged
        self._require_llm()
        corpus = snap.require_corpus()
        token = token or uuid.uuid4().hex
        local = self._llm.local
        manifest = manifest_from_corpus(
            corpus, model_id=local.model_id, model_fingerprint=local.model_fingerprint(),
            tokenizer_fingerprint=local.tokenizer_fingerprint(), config=snap.engine.config.to_dict(),
            layout=snap.engine.layout.settings(),
            extra={"node_text": "content without metadata", PERSIST_TOKEN_KEY: token})
        documents, nodes = self._records(snap.entries)
        persist_index(directory, corpus, manifest, documents, nodes, progress=progress)
        self._persisted = (str(directory.resolve()), token, snap.version)
        return token

    @classmethod
    def from_persist_dir(cls, persist_dir: str | os.PathLike, llm: Any = None, **kwargs: Any) -> Any:
        """Open a persisted KV index (``persist_dir`` or its ``sqattn_kv`` folder). With ``llm``, tensors and
        records are read in one go (one generation, checked against ``llm``'s fingerprints, on its device);
        without, only the records are read and the tensors follow once an LLM is attached."""
        from .storage import load_index_records

        directory = resolve_kv_dir(persist_dir)
        store = cls(**kwargs)
        if llm is not None:
            store._source = (str(directory), None)
            store.attach_llm(llm)
            return store
        manifest, _, records = load_index_records(directory)
        store._state = StoreSnapshot(0, None, None, entries_of(records))
        store._source = (str(directory), (manifest.extra or {}).get(PERSIST_TOKEN_KEY))
        return store
