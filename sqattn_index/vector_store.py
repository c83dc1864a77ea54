"""``SqueezedKVStore``: a LlamaIndex vector store whose "vectors" are the precomputed KV cache of the corpus.

All nodes form one fixed context (in insertion order); the store holds its squeezed ``CorpusKV`` and each
node's token span. A query is ranked by the attention the model's question tokens put on each node's
span, divided by the attention a neutral question puts there (the *attention lift*): raw attention mass
mostly follows position (recent tokens and the observation window draw most of it), the lift shows which
nodes the question itself looks at. No embeddings are involved.

Concurrency: the state (engine, corpus, node entries, baseline) lives in one immutable ``StoreSnapshot``.
Readers take it once (``snapshot()``) and use nothing else, so a question never mixes two versions; writers
are serialized by an in-process lock and publish their result with one reference swap (a second writer
waits, then applies its change on top of the first one's). Across processes the storage layer's writer
lock applies (``persist_to`` -> ``IndexLockedError`` while another process persists the same directory).

Persisted through ``sqattn_index.storage`` into ``<persist_dir>/sqattn_kv/`` (SQLite + safetensors; the
load and persist methods are in ``store_persistence.py``); it never writes a ``*vector_store.json``, so
LlamaIndex's ``SimpleVectorStore`` finds nothing to misread.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Sequence

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, MetadataFilters, VectorStoreQuery,
                                                  VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn

from .config import SqueezeConfig
from .corpus_kv import CorpusKV
from .engine import SqueezedEngine
from .errors import ConfigError, IncompatibleModelError
from .node_parsing import node_text
from .store_persistence import KV_DIRNAME, PERSIST_TOKEN_KEY, StorePersistence, resolve_kv_dir  # noqa: F401
from .store_state import BASELINE_QUESTION, NodeEntry, StoreSnapshot

__all__ = ["SqueezedKVStore", "StoreSnapshot", "KV_DIRNAME", "BASELINE_QUESTION", "PERSIST_TOKEN_KEY",
           "resolve_kv_dir"]


def _with_spans(entries: Sequence[NodeEntry], spans: Sequence[tuple[int, int]]) -> list[NodeEntry]:
    if len(spans) != len(entries):  # internal invariant of the engine's update calls
        raise AssertionError(f"engine returned {len(spans)} spans for {len(entries)} nodes")
    return [NodeEntry(e.node, e.text, (int(s[0]), int(s[1]))) for e, s in zip(entries, spans)]


def _without(engine: SqueezedEngine, corpus: CorpusKV | None, entries: list[NodeEntry], ids: set[str]):
    """(corpus, entries) with the nodes ``ids`` removed exactly (the tokens after them re-encoded)."""
    gone = [i for i, e in enumerate(entries) if e.node.node_id in ids]
    if not gone:
        return corpus, entries
    if len(gone) == len(entries):
        return None, []
    corpus, spans = engine.remove_texts(corpus, [e.span for e in entries], gone)
    return corpus, _with_spans([e for e in entries if e.node.node_id not in ids], spans)


class SqueezedKVStore(StorePersistence, BasePydanticVectorStore):
    """Vector store over a squeezed KV cache: ``add`` encodes nodes, ``query`` ranks them by attention.

    Readers use one ``snapshot()`` each; writers (``add``, ``delete``, ``delete_nodes``, ``clear``,
    ``attach_llm``, ``use_nodes``) are serialized in-process and swap in a new snapshot when done.

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
    _state: StoreSnapshot = PrivateAttr(default_factory=lambda: StoreSnapshot(0, None, None, ()))
    _write_lock: Any = PrivateAttr(default_factory=threading.RLock)
    _source: Any = PrivateAttr(default=None)  # (kv dir, persist token) of a persisted index not yet in memory
    _persisted: Any = PrivateAttr(default=None)  # (resolved dir, persist token, version) last loaded / written

    def __init__(self, llm: Any = None, config: SqueezeConfig | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._config = config
        if llm is not None:
            self.attach_llm(llm)

    @classmethod
    def class_name(cls) -> str:
        return "SqueezedKVStore"

    # ----------------------------------------------------------------------------------------- state
    def snapshot(self) -> StoreSnapshot:
        """The current immutable state; take it once per question and use only it."""
        return self._state

    @property
    def version(self) -> int:
        """Version of the current state (+1 on every writer swap)."""
        return self._state.version

    @property
    def client(self) -> Any:
        """The in-memory ``CorpusKV`` (None while empty or not yet loaded)."""
        return self._state.corpus

    @property
    def llm(self):
        return self._llm

    @property
    def engine(self) -> SqueezedEngine:
        self._require_llm()
        return self._state.engine

    @property
    def corpus(self) -> CorpusKV | None:
        return self._state.corpus

    @property
    def node_ids(self) -> list[str]:
        """Ids of the nodes in corpus order."""
        return list(self._state.node_ids)

    @property
    def nodes(self) -> list[BaseNode]:
        return self._state.nodes

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) token span of every node inside the fixed context, in corpus order."""
        return list(self._state.spans)

    @property
    def persist_token(self) -> str | None:
        """Id of the persisted generation this store was loaded from or last written as (None if neither)."""
        if self._source is not None:
            return self._source[1]
        return self._persisted[1] if self._persisted is not None else None

    def _swap(self, state: StoreSnapshot, same_content: bool = False) -> None:
        """Publish ``state`` (caller holds the write lock). ``same_content``: the persisted form is unchanged
        (richer node objects, another device), so a directory written from the old state still holds it."""
        done = self._persisted
        if same_content and done is not None and done[2] == self._state.version:
            self._persisted = (done[0], done[1], state.version)
        self._state = state

    def _require_llm(self) -> None:
        if self._llm is None:
            raise ConfigError("this SqueezedKVStore has no model: pass llm=SqueezedLLM... to it, or use it through "
                              "SqueezedKVIndex(..., llm=llm) / load_index_from_storage(..., llm=llm).")

    def require_corpus(self) -> CorpusKV:
        """The corpus, or ConfigError when the store holds no nodes."""
        self._require_llm()
        return self._state.require_corpus()

    def use_nodes(self, nodes: dict[str, BaseNode]) -> None:
        """Swap in richer node objects (e.g. from a docstore) for the nodes with the same ids."""
        with self._write_lock:
            state = self._state
            entries = [NodeEntry(nodes[e.node.node_id], e.text, e.span) if e.node.node_id in nodes else e
                       for e in state.entries]
            self._swap(state.replace(entries=entries, keep_baseline=True), same_content=True)

    # -------------------------------------------------------------------------------------- the model
    def attach_llm(self, llm: Any) -> None:
        """Use ``llm`` (a SqueezedLLM) to encode and read the corpus; loads a persisted corpus onto its device.

        Raises IncompatibleModelError when the corpus was built with another model or tokenizer."""
        from .llm import SqueezedLLM

        if not isinstance(llm, SqueezedLLM):
            raise ConfigError(f"SqueezedKVStore needs a SqueezedLLM; got {type(llm).__name__}.")
        with self._write_lock:
            if self._llm is not None and self._llm.local is llm.local:
                return
            state = self._state
            if self._llm is not None and state.corpus is not None:
                old, new = self._llm.local, llm.local
                if (old.model_fingerprint(), old.tokenizer_fingerprint()) != (new.model_fingerprint(),
                                                                               new.tokenizer_fingerprint()):
                    raise IncompatibleModelError(f"this store's corpus was built with model {old.model_id!r}; "
                                                 f"{new.model_id!r} differs. Rebuild the index with that model.")
            if self._source is not None:
                self._load_corpus(llm)
            elif state.engine is None:
                cfg = self._config
                engine = llm.engine if cfg is None or cfg == llm.config else SqueezedEngine(llm.local, cfg)
                self._swap(state.replace(engine=engine, keep_baseline=True), same_content=True)
            else:
                engine = SqueezedEngine(llm.local, state.engine.config, state.engine.layout.instructions)
                corpus = state.corpus.to(llm.local.device) if state.corpus is not None else None
                self._swap(state.replace(engine=engine, corpus=corpus), same_content=True)
            self._llm = llm

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
        with self._write_lock:
            state = self._state
            engine = state.engine
            corpus, entries = _without(engine, state.corpus, list(state.entries), set(ids) & set(state.node_ids))
            new = [NodeEntry(n, node_text(n), (0, 0)) for n in nodes]
            if corpus is not None:  # exact incremental insert: continuation prefill after the corpus
                corpus, spans = engine.append_texts(corpus, [e.span for e in entries], [e.text for e in new])
                entries = entries + new
            else:
                entries = entries + new
                corpus, spans = engine.build_corpus([e.text for e in entries], progress=progress)
            self._state = state.replace(corpus=corpus, entries=_with_spans(entries, spans))
        return ids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Remove every node of document ``ref_doc_id`` from the corpus."""
        with self._write_lock:
            self._remove({e.node.node_id for e in self._state.entries if e.node.ref_doc_id == ref_doc_id})

    def delete_nodes(self, node_ids: Optional[List[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        """Remove the nodes with ``node_ids`` (and/or matching ``filters``) from the corpus."""
        if node_ids is None and (filters is None or not filters.filters):
            raise ConfigError("delete_nodes() needs node_ids or filters; use clear() to remove every node.")
        with self._write_lock:
            self._remove({e.node.node_id for e in self._matching(self._state.entries, node_ids, None, filters)})

    def clear(self) -> None:
        with self._write_lock:
            self._source = None
            self._state = self._state.replace(corpus=None, entries=())

    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        return [e.node for e in self._matching(self._state.entries, node_ids, None, filters)]

    def _remove(self, ids: set[str]) -> None:
        if not ids:
            return
        self._require_llm()
        with self._write_lock:
            state = self._state
            corpus, entries = _without(state.engine, state.corpus, list(state.entries), ids)
            if len(entries) != len(state.entries):
                self._state = state.replace(corpus=corpus, entries=entries)

    # ------------------------------------------------------------------------------------------ query
    @staticmethod
    def _matching(entries: Sequence[NodeEntry], node_ids=None, doc_ids=None,
                  filters: MetadataFilters | None = None) -> list[NodeEntry]:
        entries = list(entries)
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
        """Attention mass of a neutral question on every node (dense), cached per version."""
        self._require_llm()
        return self._state.baseline_mass()

    def node_mass(self, question: str, keep: float = 1.0, history: list[tuple[str, str]] | None = None) -> list[float]:
        """Attention mass the question's tokens put on every node's span (corpus order, current version)."""
        self._require_llm()
        return self._state.node_mass(question, keep, history)

    def lift(self, node_mass: Sequence[float]) -> list[float]:
        """Attention lift of every node: its mass over the neutral question's mass on it (current version)."""
        self._require_llm()
        return self._state.lift(node_mass)

    def rank(self, node_mass: Sequence[float], top_k: int | None = None,
             entries: list[NodeEntry] | None = None) -> list[NodeWithScore]:
        """Nodes (all, or ``entries``) with score = attention lift, best first, at most ``top_k``."""
        self._require_llm()
        return self._state.rank(node_mass, top_k, entries)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Rank stored nodes by attention lift for ``query.query_str`` (embeddings are not used)."""
        if not query.query_str or not query.query_str.strip():
            raise ConfigError("SqueezedKVStore.query needs VectorStoreQuery(query_str=...): it ranks by attention, "
                              "not by embeddings.")
        top_k = query.similarity_top_k
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"similarity_top_k must be a positive int; got {top_k!r}.")
        snap = self.snapshot()
        pool = self._matching(snap.entries, query.node_ids, query.doc_ids, query.filters)
        if snap.corpus is None or not pool:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        self._require_llm()
        ranked = snap.rank(snap.node_mass(query.query_str, self.retrieval_keep), top_k, pool)
        return VectorStoreQueryResult(nodes=[r.node for r in ranked], similarities=[r.score for r in ranked],
                                      ids=[r.node.node_id for r in ranked])
