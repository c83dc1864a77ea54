"""``SqueezedKVIndex``: a LlamaIndex index whose store is the squeezed KV cache of the whole corpus.

    index = SqueezedKVIndex.from_documents(docs, llm=llm)
    index.as_query_engine(keep=0.1).query("...")
    index.storage_context.persist("storage/")
    index = load_index("storage/", llm=llm)       # or load_index_from_storage(..., llm=llm)

Nothing here reads ``Settings.llm`` or ``Settings.embed_model``: the LLM is always passed explicitly and no
embeddings exist. The index struct type ``"squeezed_kv"`` is registered in LlamaIndex's registries at import,
so ``load_index_from_storage`` rebuilds this class.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.data_structs.data_structs import IndexStruct
from llama_index.core.data_structs.registry import INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS
from llama_index.core.indices.base import BaseIndex
from llama_index.core.indices.registry import INDEX_STRUCT_TYPE_TO_INDEX_CLASS
from llama_index.core.ingestion import run_transformations
from llama_index.core.schema import BaseNode, Document, IndexNode, TransformComponent
from llama_index.core.settings import Settings
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.index_store import SimpleIndexStore
from llama_index.core.storage.storage_context import StorageContext
from llama_index.core.storage.docstore.types import DEFAULT_PERSIST_FNAME as DOCSTORE_FNAME
from llama_index.core.storage.index_store.types import DEFAULT_PERSIST_FNAME as INDEX_STORE_FNAME
from llama_index.core.vector_stores.simple import DEFAULT_VECTOR_STORE, NAMESPACE_SEP

from .chat_engine import SqueezedChatEngine
from .config import SqueezeConfig
from .errors import ConfigError, CorruptIndexError
from .node_parsing import default_node_parser
from .query_engine import SqueezedQueryEngine
from .retriever import SqueezedKVRetriever
from .vector_store import KV_DIRNAME, SqueezedKVStore, resolve_kv_dir

__all__ = ["SqueezedKVIndex", "SqueezedKVIndexStruct", "SQUEEZED_KV_STRUCT_TYPE", "SqueezedStorageContext",
           "load_index", "squeezed_storage_context"]

SQUEEZED_KV_STRUCT_TYPE = "squeezed_kv"
_STAMP_COLLECTION, _STAMP_KEY = "sqattn/persist", "persist"  # a collection of its own in the JSON key-value stores
_LOAD_ATTEMPTS = 40  # load_index retries while a writer is persisting the same directory


class _StaleIndexError(CorruptIndexError):
    """The parts of a persist dir (KV index, index store, docstore) come from different persists."""


@dataclass
class SqueezedKVIndexStruct(IndexStruct):
    """The ids of the index's nodes in corpus order (the KV itself lives in the ``SqueezedKVStore``)."""

    node_ids: List[str] = field(default_factory=list)

    @classmethod
    def get_type(cls) -> str:  # type: ignore[override]  # not a member of LlamaIndex's IndexStructType enum
        return SQUEEZED_KV_STRUCT_TYPE


def _stamp(store: Any, token: str | None) -> None:
    """Record persist ``token`` in a key-value backed docstore / index store (None: remove it)."""
    kv = getattr(store, "_kvstore", None)
    if kv is None:
        return
    if token is None:
        kv.delete(_STAMP_KEY, collection=_STAMP_COLLECTION)
    else:
        kv.put(_STAMP_KEY, {"token": token}, collection=_STAMP_COLLECTION)


def _read_stamp(store: Any) -> str | None:
    kv = getattr(store, "_kvstore", None)
    value = kv.get(_STAMP_KEY, collection=_STAMP_COLLECTION) if kv is not None else None
    return value.get("token") if isinstance(value, dict) else None


def _replace_atomically(persist: Any, path: Path) -> None:
    """``persist(tmp)`` next to ``path``, fsync, rename over ``path``: a reader sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        persist(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SqueezedStorageContext(StorageContext):
    """A ``StorageContext`` whose ``persist`` a concurrent ``load_index`` can never see half done.

    Local persists write the KV index first (atomically, see ``sqattn_index.storage``), then every JSON file
    through a temporary file and a rename; the KV index, the docstore and the index store all carry the same
    persist token, so ``load_index`` can tell when it read parts of two persists and read again.
    Other filesystems (``fs=``) fall back to LlamaIndex's own ``persist``."""

    def persist(self, persist_dir: str | os.PathLike = "./storage", docstore_fname: str = DOCSTORE_FNAME,
                index_store_fname: str = INDEX_STORE_FNAME, vector_store_fname: str = "vector_store.json",
                image_store_fname: str = "image_store.json", graph_store_fname: str = "graph_store.json",
                pg_graph_store_fname: str = "property_graph_store.json", fs: Any = None) -> None:
        if fs is not None and "file" not in (getattr(fs, "protocol", None) or ()):
            for store in (self.docstore, self.index_store):
                _stamp(store, None)
            return super().persist(persist_dir, docstore_fname, index_store_fname, vector_store_fname,
                                   image_store_fname, graph_store_fname, pg_graph_store_fname, fs)
        root = Path(persist_dir)
        root.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        others = {}
        for name, store in self.vector_stores.items():
            if isinstance(store, SqueezedKVStore):
                token = store.persist_to(root / KV_DIRNAME, token=token)
            else:
                others[name] = store
        for store in (self.docstore, self.index_store):
            _stamp(store, token)
        parts = [(self.docstore, docstore_fname), (self.index_store, index_store_fname),
                 (self.graph_store, graph_store_fname)]
        if self.property_graph_store:
            parts.append((self.property_graph_store, pg_graph_store_fname))
        parts += [(store, f"{name}{NAMESPACE_SEP}{vector_store_fname}") for name, store in others.items()]
        for store, fname in parts:
            _replace_atomically(lambda p, s=store: s.persist(persist_path=p), root / fname)
        fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def squeezed_storage_context(store: SqueezedKVStore) -> SqueezedStorageContext:
    """A fresh in-memory storage context whose only vector store is ``store`` (no image store)."""
    from llama_index.core.graph_stores.simple import SimpleGraphStore

    return SqueezedStorageContext(docstore=SimpleDocumentStore(), index_store=SimpleIndexStore(),
                                  vector_stores={DEFAULT_VECTOR_STORE: store}, graph_store=SimpleGraphStore(),
                                  property_graph_store=None)


def _check_llm(llm: Any):
    from .llm import SqueezedLLM

    if llm is None:
        raise ConfigError("SqueezedKVIndex needs llm=SqueezedLLM.from_pretrained(...) (Settings.llm is never used).")
    if not isinstance(llm, SqueezedLLM):
        raise ConfigError(f"SqueezedKVIndex needs a SqueezedLLM as llm; got {type(llm).__name__}.")
    return llm.unbind() if llm.store is not None else llm


class SqueezedKVIndex(BaseIndex[SqueezedKVIndexStruct]):
    """A KV-cache index: the corpus is prefilled once, clustered, and read sparsely by every question.

    Args:
        nodes: nodes to encode (or ``index_struct`` + a storage context holding a ``SqueezedKVStore`` to load).
        llm: the ``SqueezedLLM`` (required).
        config: how the corpus is squeezed (default: the LLM's config).
        storage_context: where docstore / index store / vector store live (default: fresh, in memory).
        transformations: node parsers used by ``insert`` (default: ``SentenceSplitter`` on the model's tokens).
    """

    index_struct_cls = SqueezedKVIndexStruct

    def __init__(self, nodes: Optional[Sequence[BaseNode]] = None, objects: Optional[Sequence[IndexNode]] = None,
                 index_struct: Optional[SqueezedKVIndexStruct] = None,
                 storage_context: Optional[StorageContext] = None, llm: Any = None,
                 config: SqueezeConfig | None = None, callback_manager: Optional[CallbackManager] = None,
                 transformations: Optional[List[TransformComponent]] = None, show_progress: bool = False,
                 **kwargs: Any) -> None:
        self._llm = _check_llm(llm)
        if objects:
            raise ConfigError("SqueezedKVIndex does not hold IndexNode objects; pass text nodes.")
        if storage_context is None:
            storage_context = squeezed_storage_context(SqueezedKVStore(self._llm, config))
        store = storage_context.vector_stores.get(DEFAULT_VECTOR_STORE)
        if not isinstance(store, SqueezedKVStore):
            if index_struct is not None:
                raise ConfigError(
                    "loading a SqueezedKVIndex needs its KV store: StorageContext.from_defaults(persist_dir=DIR, "
                    "vector_store=SqueezedKVStore.from_persist_dir(DIR)), "
                    "or simply sqattn_index.load_index(DIR, llm=llm).")
            store = SqueezedKVStore(self._llm, config)
            storage_context.vector_stores[DEFAULT_VECTOR_STORE] = store
        store.attach_llm(self._llm)
        if type(storage_context) is StorageContext:  # persist atomically, with the token load_index checks
            storage_context.__class__ = SqueezedStorageContext
        self._kv_store = store
        transformations = transformations or [default_node_parser(self._llm)]
        super().__init__(nodes=list(nodes) if nodes is not None else None, index_struct=index_struct,
                         storage_context=storage_context, callback_manager=callback_manager,
                         transformations=transformations, show_progress=show_progress, **kwargs)
        if index_struct is not None:
            self._check_loaded()

    def _check_loaded(self) -> None:
        if list(self._index_struct.node_ids) != self._kv_store.node_ids:
            raise _StaleIndexError(
                "the index store and the KV store list different nodes (they were persisted at different times); "
                "persist the index again with index.storage_context.persist(DIR).")
        found = {}
        for node_id in self._index_struct.node_ids:
            node = self.docstore.get_node(node_id, raise_error=False)
            if node is not None:
                found[node_id] = node
        self._kv_store.use_nodes(found)

    @classmethod
    def from_documents(cls, documents: Sequence[Document], storage_context: Optional[StorageContext] = None,
                       show_progress: bool = False, callback_manager: Optional[CallbackManager] = None,
                       transformations: Optional[List[TransformComponent]] = None, llm: Any = None,
                       config: SqueezeConfig | None = None, **kwargs: Any) -> "SqueezedKVIndex":
        """Split ``documents`` (default: ``SentenceSplitter`` on the model's own tokens) and encode them."""
        llm = _check_llm(llm)
        transformations = transformations or [default_node_parser(llm)]
        if storage_context is None:
            storage_context = squeezed_storage_context(SqueezedKVStore(llm, config))
        callback_manager = callback_manager or Settings.callback_manager
        with callback_manager.as_trace("index_construction"):
            for doc in documents:
                storage_context.docstore.set_document_hash(doc.id_, doc.hash)
            nodes = run_transformations(list(documents), transformations, show_progress=show_progress)
            return cls(nodes=nodes, storage_context=storage_context, llm=llm, config=config,
                       callback_manager=callback_manager, transformations=transformations,
                       show_progress=show_progress, **kwargs)

    @classmethod
    def from_vector_store(cls, vector_store: SqueezedKVStore, llm: Any, **kwargs: Any) -> "SqueezedKVIndex":
        """An index over an existing (e.g. loaded) ``SqueezedKVStore``; its nodes fill a fresh docstore."""
        llm = _check_llm(llm)
        vector_store.attach_llm(llm)
        context = squeezed_storage_context(vector_store)
        context.docstore.add_documents(vector_store.nodes, allow_update=True)
        struct = SqueezedKVIndexStruct(node_ids=vector_store.node_ids)
        return cls(index_struct=struct, storage_context=context, llm=llm, **kwargs)

    # ------------------------------------------------------------------------------------------ state
    @property
    def vector_store(self) -> SqueezedKVStore:
        return self._kv_store

    @property
    def llm(self):
        """The (unbound) ``SqueezedLLM`` of this index."""
        return self._llm

    def _build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> SqueezedKVIndexStruct:
        struct = SqueezedKVIndexStruct()
        self._kv_store.add(list(nodes), progress=self._show_progress)
        struct.node_ids = self._kv_store.node_ids
        return struct

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        self._kv_store.add(list(nodes), progress=self._show_progress)
        self._index_struct.node_ids = self._kv_store.node_ids

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        self.delete_nodes([node_id])

    def delete_nodes(self, node_ids: List[str], delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        """Remove nodes from the corpus (one re-encode for the whole batch)."""
        self._kv_store.delete_nodes(list(node_ids))
        self._index_struct.node_ids = self._kv_store.node_ids
        if delete_from_docstore:
            for node_id in node_ids:
                self.docstore.delete_document(node_id, raise_error=False)
        self._storage_context.index_store.add_index_struct(self._index_struct)

    async def adelete_nodes(self, node_ids: List[str], delete_from_docstore: bool = False,
                            **delete_kwargs: Any) -> None:
        self.delete_nodes(node_ids, delete_from_docstore, **delete_kwargs)

    @property
    def ref_doc_info(self) -> Dict[str, RefDocInfo]:
        """Ingested documents (by ref_doc_id) and the ids of their nodes."""
        out: Dict[str, RefDocInfo] = {}
        for node in self._kv_store.nodes:
            ref = node.ref_doc_id
            if ref is None or ref in out:
                continue
            info = self.docstore.get_ref_doc_info(ref)
            if info is not None:
                out[ref] = info
        return out

    # --------------------------------------------------------------------------------------- engines
    def as_retriever(self, similarity_top_k: int = 3, **kwargs: Any) -> SqueezedKVRetriever:
        """Nodes ranked by the attention the question puts on them (score = attention lift)."""
        kwargs.pop("llm", None)
        return SqueezedKVRetriever(self._kv_store, similarity_top_k=similarity_top_k, docstore=self.docstore,
                                   callback_manager=kwargs.pop("callback_manager", self._callback_manager), **kwargs)

    def as_query_engine(self, llm: Any = None, keep: float = 0.1, streaming: bool = False,
                        max_new_tokens: int | None = None, **kwargs: Any) -> SqueezedQueryEngine:
        """Answer over the whole cached corpus, attending to ``keep`` of its KV (1.0 = dense)."""
        self._use_llm(llm)
        if "similarity_top_k" in kwargs:  # the LlamaIndex name for how many source nodes come back
            kwargs.setdefault("source_top_k", kwargs.pop("similarity_top_k"))
        return SqueezedQueryEngine(self._kv_store, keep=keep, streaming=streaming, max_new_tokens=max_new_tokens,
                                   docstore=self.docstore,
                                   callback_manager=kwargs.pop("callback_manager", self._callback_manager), **kwargs)

    def as_chat_engine(self, chat_mode: Any = None, llm: Any = None, keep: float = 0.1,
                       max_new_tokens: int | None = None, **kwargs: Any) -> SqueezedChatEngine:
        """Chat over the cached corpus: corpus attended sparsely (``keep``), the conversation densely."""
        from llama_index.core.chat_engine.types import ChatMode

        native = (None, ChatMode.BEST, ChatMode.CONTEXT, ChatMode.CONDENSE_PLUS_CONTEXT)
        if chat_mode not in native:
            raise ConfigError(f"SqueezedKVIndex chats over its cached corpus; chat_mode {chat_mode!r} is not "
                              "supported (leave it unset).")
        self._use_llm(llm)
        if "similarity_top_k" in kwargs:
            kwargs.setdefault("source_top_k", kwargs.pop("similarity_top_k"))
        return SqueezedChatEngine(self._kv_store, keep=keep, max_new_tokens=max_new_tokens, docstore=self.docstore,
                                  **kwargs)

    def _use_llm(self, llm: Any) -> None:
        if llm is not None and _check_llm(llm).local is not self._llm.local:
            raise ConfigError("this index was encoded with another SqueezedLLM; pass that one or none.")


def load_index(persist_dir: str | os.PathLike, llm: Any, **kwargs: Any) -> SqueezedKVIndex:
    """Load a persisted index: a LlamaIndex persist dir (``storage_context.persist``) or a bare KV index dir.

    Safe while another thread or process persists the same directory: the KV index is read as one
    generation, and when the docstore / index store turn out to come from another persist than the KV
    index, everything is read again (after ~15 s of that, e.g. after a writer crashed between the parts,
    the index is rebuilt from the KV index alone, with a warning)."""
    llm = _check_llm(llm)
    path = Path(persist_dir)
    if not ((path / INDEX_STORE_FNAME).is_file() and resolve_kv_dir(path) == path / KV_DIRNAME):
        return SqueezedKVIndex.from_vector_store(SqueezedKVStore.from_persist_dir(path, llm=llm), llm=llm, **kwargs)
    last: Exception | None = None
    for attempt in range(_LOAD_ATTEMPTS):
        try:
            return _load_persist_dir(path, llm, **kwargs)
        except (_StaleIndexError, json.JSONDecodeError) as exc:  # a writer is between the parts of a persist
            last = exc
            time.sleep(min(0.02 * (attempt + 1), 0.5))
    warnings.warn(f"{path}: the docstore / index store do not match the KV index after {_LOAD_ATTEMPTS} reads "
                  f"({last}); loading the KV index alone. Persist the index again to repair it.", stacklevel=2)
    return SqueezedKVIndex.from_vector_store(SqueezedKVStore.from_persist_dir(path, llm=llm), llm=llm, **kwargs)


def _load_persist_dir(path: Path, llm: Any, **kwargs: Any) -> SqueezedKVIndex:
    """One attempt: JSON stores, KV records (cheap check), KV tensors; _StaleIndexError when the parts come
    from different persists."""
    from llama_index.core import load_index_from_storage

    from .storage import load_index_records
    from .vector_store import PERSIST_TOKEN_KEY

    index_store = SimpleIndexStore.from_persist_dir(str(path))
    docstore = SimpleDocumentStore.from_persist_dir(str(path))
    tokens = {_read_stamp(index_store), _read_stamp(docstore)}
    for part in (index_store, docstore):
        _stamp(part, None)  # a later persist by plain LlamaIndex code must not carry a stale token

    def check(kv_token: str | None) -> None:
        if kv_token is not None and tokens != {None} and tokens != {kv_token}:
            raise _StaleIndexError(f"{path}: KV index of persist {kv_token}, JSON stores of "
                                   f"{sorted(map(str, tokens))}")

    manifest, _, _ = load_index_records(path / KV_DIRNAME)
    check((manifest.extra or {}).get(PERSIST_TOKEN_KEY))  # before reading any tensor
    store = SqueezedKVStore.from_persist_dir(path, llm=llm)
    check(store.persist_token)
    context = SqueezedStorageContext.from_defaults(docstore=docstore, index_store=index_store, vector_store=store,
                                                   persist_dir=str(path))
    return load_index_from_storage(context, llm=llm, **kwargs)


INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS[SQUEEZED_KV_STRUCT_TYPE] = SqueezedKVIndexStruct  # type: ignore[index]
INDEX_STRUCT_TYPE_TO_INDEX_CLASS[SQUEEZED_KV_STRUCT_TYPE] = SqueezedKVIndex  # type: ignore[index]
