"""``SqueezedKVStore``: a LlamaIndex vector store whose "vectors" are the precomputed KV cache of the corpus.

All nodes form one fixed context (in insertion order); the store holds its squeezed ``CorpusKV`` and each
node's token span. A query is ranked by the attention the model's question tokens put on each node's
span, divided by the attention a neutral question puts there (the *attention lift*): raw attention mass
mostly follows position (recent tokens and the observation window draw most of it), the lift shows which
nodes the question itself looks at. No embeddings are involved.

Persisted through ``sqattn_index.storage`` into ``<persist_dir>/sqattn_kv/`` (SQLite + safetensors); it
never writes a ``*vector_store.json``, so LlamaIndex's ``SimpleVectorStore`` finds nothing to misread.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, MetadataFilters, VectorStoreQuery,
                                                  VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn

from .config import SqueezeConfig, check_keep
from .corpus_kv import CorpusKV
from .engine import SqueezedEngine, span_mass
from .errors import ConfigError, CorruptIndexError, IncompatibleModelError
from .node_parsing import node_text
from .prompt_layout import DEFAULT_INSTRUCTIONS, PromptLayout

__all__ = ["SqueezedKVStore", "KV_DIRNAME", "BASELINE_QUESTION", "resolve_kv_dir"]

KV_DIRNAME = "sqattn_kv"  # the KV index's folder inside a LlamaIndex persist dir
BASELINE_QUESTION = "What do the documents say?"  # the neutral question of the attention lift
_EPS = 1e-12


@dataclass
class _Entry:
    """One node of the corpus: the node, the text the model reads, its [start, end) token span."""

    node: BaseNode
    text: str
    span: tuple[int, int]


def resolve_kv_dir(directory: str | os.PathLike) -> Path:
    """The KV index folder of ``directory``: ``directory/sqattn_kv`` (a LlamaIndex persist dir) or
    ``directory`` itself (a bare KV index). CorruptIndexError when neither holds one."""
    from .storage import index_exists
    from .storage.atomic import COMMIT_FILE

    path = Path(directory)
    kv = path / KV_DIRNAME
    if any(p.exists() for p in (kv, path / f".{KV_DIRNAME}.old", path / f".{KV_DIRNAME}.new")) and index_exists(kv):
        return kv
    if (path / COMMIT_FILE).is_file():
        return path
    raise CorruptIndexError(f"no sqattn KV index under {path} (looked for {kv} and {path / COMMIT_FILE}); "
                            "persist an index there first or check the path.")


def _record_node(rec) -> TextNode:
    rel = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=rec.ref_doc_id)} if rec.ref_doc_id else {}
    return TextNode(id_=rec.node_id, text=rec.text, metadata=dict(rec.metadata), relationships=rel)


class SqueezedKVStore(BasePydanticVectorStore):
    """Vector store over a squeezed KV cache: ``add`` encodes nodes, ``query`` ranks them by attention.

    Args:
        llm: the ``SqueezedLLM`` whose model encodes and reads the corpus (may be attached later).
        config: how the corpus is squeezed (default: the LLM's config).
    """

    stores_text: bool = False
    is_embedding_query: bool = False
    flat_metadata: bool = False
    retrieval_keep: float = Field(default=1.0, gt=0.0, le=1.0,
                                  description="Fraction of the corpus KV attended when ranking nodes (1.0 = all).")

    _llm: Any = PrivateAttr(default=None)
    _config: Optional[SqueezeConfig] = PrivateAttr(default=None)
    _engine: Optional[SqueezedEngine] = PrivateAttr(default=None)
    _corpus: Optional[CorpusKV] = PrivateAttr(default=None)
    _entries: List[_Entry] = PrivateAttr(default_factory=list)
    _source: Any = PrivateAttr(default=None)  # (kv dir, manifest) of a persisted index not yet in memory
    _baseline: Optional[List[float]] = PrivateAttr(default=None)

    def __init__(self, llm: Any = None, config: SqueezeConfig | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._config = config
        if llm is not None:
            self.attach_llm(llm)

    @classmethod
    def class_name(cls) -> str:
        return "SqueezedKVStore"

    # ----------------------------------------------------------------------------------------- state
    @property
    def client(self) -> Any:
        """The in-memory ``CorpusKV`` (None while empty or not yet loaded)."""
        return self._corpus

    @property
    def llm(self):
        return self._llm

    @property
    def engine(self) -> SqueezedEngine:
        self._require_llm()
        return self._engine

    @property
    def corpus(self) -> CorpusKV | None:
        return self._corpus

    @property
    def node_ids(self) -> list[str]:
        """Ids of the nodes in corpus order."""
        return [e.node.node_id for e in self._entries]

    @property
    def nodes(self) -> list[BaseNode]:
        return [e.node for e in self._entries]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) token span of every node inside the fixed context, in corpus order."""
        return [e.span for e in self._entries]

    def _require_llm(self) -> None:
        if self._llm is None:
            raise ConfigError("this SqueezedKVStore has no model: pass llm=SqueezedLLM... to it, or use it through "
                              "SqueezedKVIndex(..., llm=llm) / load_index_from_storage(..., llm=llm).")

    def require_corpus(self) -> CorpusKV:
        """The corpus, or ConfigError when the store holds no nodes."""
        self._require_llm()
        if self._corpus is None:
            raise ConfigError("the squeezed index holds no nodes; add documents before asking questions.")
        return self._corpus

    def use_nodes(self, nodes: dict[str, BaseNode]) -> None:
        """Swap in richer node objects (e.g. from a docstore) for the nodes with the same ids."""
        for e in self._entries:
            if e.node.node_id in nodes:
                e.node = nodes[e.node.node_id]

    # -------------------------------------------------------------------------------------- the model
    def attach_llm(self, llm: Any) -> None:
        """Use ``llm`` (a SqueezedLLM) to encode and read the corpus; loads a persisted corpus onto its device.

        Raises IncompatibleModelError when the corpus was built with another model or tokenizer."""
        from .llm import SqueezedLLM

        if not isinstance(llm, SqueezedLLM):
            raise ConfigError(f"SqueezedKVStore needs a SqueezedLLM; got {type(llm).__name__}.")
        if self._llm is not None and self._llm.local is llm.local:
            return
        if self._llm is not None and self._corpus is not None:
            old, new = self._llm.local, llm.local
            if (old.model_fingerprint(), old.tokenizer_fingerprint()) != (new.model_fingerprint(),
                                                                           new.tokenizer_fingerprint()):
                raise IncompatibleModelError(f"this store's corpus was built with model {old.model_id!r}; "
                                             f"{new.model_id!r} differs. Rebuild the index with that model.")
        self._llm = llm
        if self._source is not None:
            self._load_corpus()
        elif self._engine is None:
            cfg = self._config
            self._engine = llm.engine if cfg is None or cfg == llm.config else SqueezedEngine(llm.local, cfg)
        else:
            self._engine = SqueezedEngine(llm.local, self._engine.config, self._engine.layout.instructions)
            self._corpus = self._corpus.to(llm.local.device) if self._corpus is not None else None

    def _load_corpus(self) -> None:
        from .storage import load_index_files

        directory, manifest = self._source
        local = self._llm.local
        corpus, manifest, _, records = load_index_files(
            directory, device=local.device, expected_model_fingerprint=local.model_fingerprint(),
            expected_tokenizer_fingerprint=local.tokenizer_fingerprint())
        if [r.node_id for r in sorted(records, key=lambda r: r.position)] != self.node_ids:
            raise CorruptIndexError(f"index at {directory} changed while loading; load it again.")
        config = dict(manifest.config or {})
        config["backend"] = self._llm.config.backend
        layout = manifest.layout or {}
        engine = SqueezedEngine(local, SqueezeConfig.from_dict(config), layout.get("instructions",
                                                                                    DEFAULT_INSTRUCTIONS))
        if "question_prefix" in layout and layout["question_prefix"] != engine.layout.question_prefix:
            engine.layout = PromptLayout(local.tokenizer, engine.layout.instructions, layout["question_prefix"])
        for key in ("kind", "node_separator"):
            if key in layout and layout[key] != engine.layout.settings()[key]:
                raise IncompatibleModelError(f"index at {directory} uses prompt layout {key}={layout[key]!r}; "
                                             f"this code renders {engine.layout.settings()[key]!r}. Rebuild it.")
        self._engine, self._corpus, self._source = engine, corpus, None

    # ------------------------------------------------------------------------------------ add / delete
    def add(self, nodes: Sequence[BaseNode], progress: bool = False, **kwargs: Any) -> List[str]:
        """Encode ``nodes`` at the end of the corpus (a node whose id is already stored is replaced)."""
        self._require_llm()
        nodes = list(nodes)
        if not nodes:
            return []
        ids = [n.node_id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ConfigError("add() got several nodes with the same node_id; give every node its own id.")
        replaced = set(ids) & set(self.node_ids)
        if replaced:
            self._remove(replaced)
        new = [_Entry(n, node_text(n), (0, 0)) for n in nodes]
        if self._corpus is not None:  # exact incremental insert: continuation prefill after the corpus
            self._corpus, spans = self._engine.append_texts(self._corpus, self.spans, [e.text for e in new])
            self._entries += new
            self._set_spans(spans)
        else:
            self._entries += new
            self._rebuild(progress)
        return ids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Remove every node of document ``ref_doc_id`` from the corpus."""
        self._remove({e.node.node_id for e in self._entries if e.node.ref_doc_id == ref_doc_id})

    def delete_nodes(self, node_ids: Optional[List[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        """Remove the nodes with ``node_ids`` (and/or matching ``filters``) from the corpus."""
        if node_ids is None and (filters is None or not filters.filters):
            raise ConfigError("delete_nodes() needs node_ids or filters; use clear() to remove every node.")
        self._remove({e.node.node_id for e in self._matching(node_ids, None, filters)})

    def clear(self) -> None:
        self._entries, self._corpus, self._baseline, self._source = [], None, None, None

    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        return [e.node for e in self._matching(node_ids, None, filters)]

    def _remove(self, ids: set[str]) -> None:
        if not ids:
            return
        self._require_llm()
        gone = [i for i, e in enumerate(self._entries) if e.node.node_id in ids]
        if len(gone) == len(self._entries):
            self.clear()
            return
        # exact delete: the texts and their separators go, every token after them is re-encoded
        self._corpus, spans = self._engine.remove_texts(self._corpus, self.spans, gone)
        self._entries = [e for e in self._entries if e.node.node_id not in ids]
        self._set_spans(spans)

    def _set_spans(self, spans: Sequence[tuple[int, int]]) -> None:
        if len(spans) != len(self._entries):  # internal invariant of the engine's update calls
            raise AssertionError(f"engine returned {len(spans)} spans for {len(self._entries)} nodes")
        for e, span in zip(self._entries, spans):
            e.span = (int(span[0]), int(span[1]))
        self._baseline = None

    def _rebuild(self, progress: bool = False) -> None:
        self._baseline = None
        if not self._entries:
            self._corpus = None
            return
        self._corpus, spans = self._engine.build_corpus([e.text for e in self._entries], progress=progress)
        self._set_spans(spans)

    # ------------------------------------------------------------------------------------------ query
    def _matching(self, node_ids=None, doc_ids=None, filters: MetadataFilters | None = None) -> list[_Entry]:
        entries = self._entries
        if node_ids is not None:
            wanted = set(node_ids)
            entries = [e for e in entries if e.node.node_id in wanted]
        if doc_ids is not None:
            wanted = set(doc_ids)
            entries = [e for e in entries if e.node.ref_doc_id in wanted]
        if filters is not None and filters.filters:
            meta = {e.node.node_id: e.node.metadata for e in entries}
            keep = build_metadata_filter_fn(lambda node_id: meta[node_id], filters)
            entries = [e for e in entries if keep(e.node.node_id)]
        return entries

    def baseline_mass(self) -> list[float]:
        """Attention mass of a neutral question on every node (dense), cached until the corpus changes."""
        if self._baseline is None:
            corpus = self.require_corpus()
            self._baseline = span_mass(self._engine.attention_mass(corpus, BASELINE_QUESTION, keep=1.0), self.spans)
        return self._baseline

    def node_mass(self, question: str, keep: float = 1.0, history: list[tuple[str, str]] | None = None) -> list[float]:
        """Attention mass the question's tokens put on every node's span (corpus order)."""
        corpus = self.require_corpus()
        return span_mass(self._engine.attention_mass(corpus, question, keep=check_keep(keep), history=history),
                         self.spans)

    def lift(self, node_mass: Sequence[float]) -> list[float]:
        """Attention lift of every node: its mass over the neutral question's mass on it."""
        return [m / max(b, _EPS) for m, b in zip(node_mass, self.baseline_mass())]

    def rank(self, node_mass: Sequence[float], top_k: int | None = None,
             entries: list[_Entry] | None = None) -> list[NodeWithScore]:
        """Nodes (all, or ``entries``) with score = attention lift, best first, at most ``top_k``."""
        lift = dict(zip(self.node_ids, self.lift(node_mass)))
        pool = self._entries if entries is None else entries
        ranked = sorted(pool, key=lambda e: -lift[e.node.node_id])[: top_k if top_k is not None else len(pool)]
        return [NodeWithScore(node=e.node, score=float(lift[e.node.node_id])) for e in ranked]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Rank stored nodes by attention lift for ``query.query_str`` (embeddings are not used)."""
        if not query.query_str or not query.query_str.strip():
            raise ConfigError("SqueezedKVStore.query needs VectorStoreQuery(query_str=...): it ranks by attention, "
                              "not by embeddings.")
        top_k = query.similarity_top_k
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"similarity_top_k must be a positive int; got {top_k!r}.")
        pool = self._matching(query.node_ids, query.doc_ids, query.filters)
        if self._corpus is None or not pool:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        ranked = self.rank(self.node_mass(query.query_str, self.retrieval_keep), top_k, pool)
        return VectorStoreQueryResult(nodes=[r.node for r in ranked], similarities=[r.score for r in ranked],
                                      ids=[r.node.node_id for r in ranked])

    # ------------------------------------------------------------------------------------ persistence
    def _records(self):
        from .storage import DocumentRecord, NodeRecord

        nodes, docs = [], {}
        for pos, e in enumerate(self._entries):
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

    def persist_to(self, directory: str | os.PathLike, progress: bool = False) -> None:
        """Write the KV index (SQLite metadata + safetensors) atomically into ``directory``."""
        from .storage import manifest_from_corpus, persist_index

        directory = Path(directory)
        if self._source is not None:
            if Path(self._source[0]).resolve() == directory.resolve():
                return  # unchanged since it was read from there
            raise ConfigError("attach a SqueezedLLM (SqueezedKVIndex(..., llm=llm)) before persisting a loaded store "
                              "elsewhere.")
        corpus = self.require_corpus()
        local = self._llm.local
        manifest = manifest_from_corpus(
            corpus, model_id=local.model_id, model_fingerprint=local.model_fingerprint(),
            tokenizer_fingerprint=local.tokenizer_fingerprint(), config=self._engine.config.to_dict(),
            layout=self._engine.layout.settings(), extra={"node_text": "content without metadata"})
        documents, nodes = self._records()
        persist_index(directory, corpus, manifest, documents, nodes, progress=progress)

    @classmethod
    def from_persist_dir(cls, persist_dir: str | os.PathLike, llm: Any = None, **kwargs: Any) -> "SqueezedKVStore":
        """Open a persisted KV index (``persist_dir`` or its ``sqattn_kv`` folder). Tensors are read, checked
        against ``llm``'s fingerprints and moved to its device once an LLM is attached."""
        from .storage import load_index_records

        directory = resolve_kv_dir(persist_dir)
        manifest, _, records = load_index_records(directory)
        store = cls(**kwargs)
        store._entries = [_Entry(_record_node(r), r.text, (r.token_start, r.token_end))
                          for r in sorted(records, key=lambda r: r.position)]
        store._source = (str(directory), manifest)
        if llm is not None:
            store.attach_llm(llm)
        return store
