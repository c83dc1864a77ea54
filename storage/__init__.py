"""Persistent storage of sqattn_index (installed as ``sqattn_index.storage``): SQLAlchemy metadata
database + one safetensors file per layer, written atomically, verified on load."""

from .atomic import writer_lock
from .records import (FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, DocumentRecord, IndexManifest, NodeRecord,
                      manifest_from_corpus)
from .store import (KVStoreFiles, index_exists, load_index_files, load_index_records, persist_index,
                    recover_index)
from .tensor_files import CORPUS_FILE, layer_file_name

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "IndexManifest",
    "DocumentRecord",
    "NodeRecord",
    "manifest_from_corpus",
    "KVStoreFiles",
    "persist_index",
    "load_index_files",
    "load_index_records",
    "index_exists",
    "recover_index",
    "writer_lock",
    "CORPUS_FILE",
    "layer_file_name",
]
