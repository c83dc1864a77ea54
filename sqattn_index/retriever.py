"""``SqueezedKVRetriever``: a LlamaIndex retriever that ranks the corpus nodes by attention lift.

It feeds any standard LlamaIndex component, e.g. ``RetrieverQueryEngine.from_args(retriever, llm=llm)``.
"""

from __future__ import annotations

from typing import Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters, VectorStoreQuery

from .errors import ConfigError

__all__ = ["SqueezedKVRetriever"]


class SqueezedKVRetriever(BaseRetriever):
    """Top ``similarity_top_k`` nodes of a ``SqueezedKVStore`` for a question, score = attention lift.

    Args:
        vector_store: the store to rank (its LLM must be attached).
        similarity_top_k: how many nodes to return.
        docstore: where to look up the full node objects (optional; the store's nodes otherwise).
        filters, node_ids, doc_ids: restrict the candidates, as for any LlamaIndex vector store.
    """

    def __init__(self, vector_store: Any, similarity_top_k: int = 3, docstore: Any = None,
                 filters: Optional[MetadataFilters] = None, node_ids: Optional[List[str]] = None,
                 doc_ids: Optional[List[str]] = None, callback_manager: Optional[CallbackManager] = None,
                 verbose: bool = False, **kwargs: Any):
        if not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise ConfigError(f"similarity_top_k must be a positive int; got {similarity_top_k!r}.")
        self._store = vector_store
        self._top_k = similarity_top_k
        self._docstore = docstore
        self._filters, self._node_ids, self._doc_ids = filters, node_ids, doc_ids
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def similarity_top_k(self) -> int:
        return self._top_k

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        result = self._store.query(VectorStoreQuery(
            query_str=query_bundle.query_str, similarity_top_k=self._top_k, filters=self._filters,
            node_ids=self._node_ids, doc_ids=self._doc_ids))
        out = []
        for node, score in zip(result.nodes or [], result.similarities or []):
            if self._docstore is not None:
                node = self._docstore.get_node(node.node_id, raise_error=False) or node
            out.append(NodeWithScore(node=node, score=score))
        return out
