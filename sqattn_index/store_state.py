"""Immutable versions of a ``SqueezedKVStore``'s state, for readers that run while a writer updates.

A ``StoreSnapshot`` holds everything one question needs (engine, corpus KV, node entries with their token
spans, the neutral question's attention mass) and never changes. A writer computes the next state off to
the side and swaps the store's reference to a new snapshot in one assignment; a reader takes the reference
once (``store.snapshot()``) and uses only that object, so it never mixes two versions.

    snap = store.snapshot()
    answer = snap.engine.answer(snap.require_corpus(), question, spans=list(snap.spans))
    sources = snap.rank(answer.node_mass, top_k=3)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

from llama_index.core.schema import BaseNode, NodeWithScore

from .config import check_keep
from .corpus_kv import CorpusKV
from .engine import span_mass
from .errors import ConfigError

__all__ = ["StoreSnapshot", "NodeEntry", "BASELINE_QUESTION"]

BASELINE_QUESTION = "What do the documents say?"  # the neutral question of the attention lift
_EPS = 1e-12


@dataclass(frozen=True)
class NodeEntry:
    """One node of the corpus: the node, the text the model reads, its [start, end) token span."""

    node: BaseNode
    text: str
    span: tuple[int, int]


class StoreSnapshot:
    """One version of a store: ``version`` (0, 1, ... per store object, +1 on every writer swap), the
    ``engine`` (None until an LLM is attached), the ``corpus`` (None while empty or not yet loaded) and the
    node ``entries`` in corpus order. Immutable, except that the baseline mass is computed once on demand."""

    __slots__ = ("version", "engine", "corpus", "entries", "node_ids", "spans", "_baseline", "_lock")

    def __init__(self, version: int, engine: Any, corpus: CorpusKV | None, entries: Sequence[NodeEntry],
                 baseline: list[float] | None = None):
        self.version = int(version)
        self.engine = engine
        self.corpus = corpus
        self.entries: tuple[NodeEntry, ...] = tuple(entries)
        self.node_ids: tuple[str, ...] = tuple(e.node.node_id for e in self.entries)
        self.spans: tuple[tuple[int, int], ...] = tuple(e.span for e in self.entries)
        self._baseline = tuple(baseline) if baseline is not None else None
        self._lock = threading.Lock()

    def replace(self, *, engine: Any = ..., corpus: Any = ..., entries: Any = ..., keep_baseline: bool = False
                ) -> "StoreSnapshot":
        """The next version: the given fields replaced (``...`` = unchanged)."""
        return StoreSnapshot(self.version + 1, self.engine if engine is ... else engine,
                             self.corpus if corpus is ... else corpus, self.entries if entries is ... else entries,
                             list(self._baseline) if keep_baseline and self._baseline is not None else None)

    @property
    def nodes(self) -> list[BaseNode]:
        return [e.node for e in self.entries]

    def require_corpus(self) -> CorpusKV:
        """The corpus, or ConfigError when this version holds no nodes (or no model is attached)."""
        if self.engine is None:
            raise ConfigError("this SqueezedKVStore has no model: pass llm=SqueezedLLM... to it, or use it through "
                              "SqueezedKVIndex(..., llm=llm) / load_index_from_storage(..., llm=llm).")
        if self.corpus is None:
            raise ConfigError("the squeezed index holds no nodes; add documents before asking questions.")
        return self.corpus

    # ----------------------------------------------------------------------------------- attention
    def baseline_mass(self) -> list[float]:
        """Attention mass of a neutral question on every node (dense); computed once per version."""
        with self._lock:
            if self._baseline is None:
                corpus = self.require_corpus()
                mass = self.engine.attention_mass(corpus, BASELINE_QUESTION, keep=1.0)
                self._baseline = tuple(span_mass(mass, list(self.spans)))
            return list(self._baseline)

    def node_mass(self, question: str, keep: float = 1.0,
                  history: list[tuple[str, str]] | None = None) -> list[float]:
        """Attention mass the question's tokens put on every node's span (corpus order)."""
        corpus = self.require_corpus()
        mass = self.engine.attention_mass(corpus, question, keep=check_keep(keep), history=history)
        return span_mass(mass, list(self.spans))

    def lift(self, node_mass: Sequence[float]) -> list[float]:
        """Attention lift of every node: its mass over the neutral question's mass on it."""
        return [m / max(b, _EPS) for m, b in zip(node_mass, self.baseline_mass())]

    def rank(self, node_mass: Sequence[float], top_k: int | None = None,
             entries: Sequence[NodeEntry] | None = None) -> list[NodeWithScore]:
        """Nodes (all, or ``entries``) with score = attention lift, best first, at most ``top_k``."""
        if len(node_mass) != len(self.entries):
            raise ConfigError(f"node_mass has {len(node_mass)} values but this index version has "
                              f"{len(self.entries)} nodes; compute it on the same snapshot.")
        lift = dict(zip(self.node_ids, self.lift(node_mass)))
        pool = self.entries if entries is None else entries
        ranked = sorted(pool, key=lambda e: -lift[e.node.node_id])[: top_k if top_k is not None else len(pool)]
        return [NodeWithScore(node=e.node, score=float(lift[e.node.node_id])) for e in ranked]
