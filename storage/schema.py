"""SQLAlchemy 2.0 schema of the index metadata: one ``index_info`` row per index generation,
its ``documents``, ``nodes`` and ``layers`` (tensor file name, sha256, size, cluster counts, thresholds).

Every table is keyed by ``index_uid`` (a fresh uuid4 hex per persisted generation), so one database
(e.g. PostgreSQL through ``db_url``) can hold several indexes, and a new generation can be written
beside the old one before the directory swap makes it current.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Engine, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "IndexInfoRow", "DocumentRow", "NodeRow", "LayerRow", "make_engine"]

UID = String(32)
ID = String(255)
SHA = String(64)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, int: Integer, str: Text}


class IndexInfoRow(Base):
    """The manifest of one index generation (see ``records.IndexManifest``) and its corpus file."""

    __tablename__ = "index_info"

    index_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    directory: Mapped[str]  # absolute path of the index directory at persist time
    format_version: Mapped[int]
    created_at: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str]
    model_fingerprint: Mapped[str] = mapped_column(String(255))
    tokenizer_fingerprint: Mapped[str] = mapped_column(String(255))
    dtype: Mapped[str] = mapped_column(String(32))
    num_layers: Mapped[int]
    num_kv_heads: Mapped[int]
    head_dim: Mapped[int]
    num_tokens: Mapped[int]
    sink_tokens: Mapped[int]
    window_tokens: Mapped[int]
    keep_ladder: Mapped[list]  # [L] floats
    config: Mapped[dict]  # SqueezeConfig.to_dict()
    layout: Mapped[dict]
    extra: Mapped[dict]
    corpus_file: Mapped[str] = mapped_column(ID)
    corpus_sha256: Mapped[str] = mapped_column(SHA)
    corpus_bytes: Mapped[int] = mapped_column(BigInteger)


class DocumentRow(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("index_uid", "ref_doc_id"),)

    index_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    ordinal: Mapped[int] = mapped_column(primary_key=True)  # order of the documents list
    ref_doc_id: Mapped[str] = mapped_column(ID)
    # "metadata" is reserved on declarative classes, hence the attribute name
    meta: Mapped[dict] = mapped_column("metadata", JSON)
    text_hash: Mapped[str] = mapped_column(String(128))
    token_start: Mapped[int]
    token_end: Mapped[int]


class NodeRow(Base):
    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("index_uid", "node_id"),)

    index_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)  # order in the corpus
    node_id: Mapped[str] = mapped_column(ID)
    ref_doc_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    text: Mapped[str]
    meta: Mapped[dict] = mapped_column("metadata", JSON)
    token_start: Mapped[int]
    token_end: Mapped[int]


class LayerRow(Base):
    """One decoder layer's tensor file and cluster statistics.

    ``thresholds``: ``[{"keep": k, "fine": [Hk floats], "coarse": [Hk floats]}, ...]`` per keep fraction
    of the ladder (informational copy; the tensors in the layer file are authoritative).
    """

    __tablename__ = "layers"

    index_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    layer: Mapped[int] = mapped_column(primary_key=True)
    file_name: Mapped[str] = mapped_column(ID)
    sha256: Mapped[str] = mapped_column(SHA)
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    num_fine: Mapped[int]  # fine clusters per KV head
    num_coarse: Mapped[int]  # coarse clusters per KV head
    thresholds: Mapped[list]


def make_engine(url: str, *, wal: bool = False, **kwargs) -> Engine:
    """An engine for ``url``. ``wal=True`` (SQLite only) switches a shared metadata database to
    write-ahead logging so readers of an old generation never wait on the writer of a new one."""
    engine = create_engine(url, **kwargs)
    if wal and engine.dialect.name == "sqlite":
        # SQLite-only pragma: WAL is per database file and set on connect; other backends have MVCC.
        @event.listens_for(engine, "connect")
        def _set_wal(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

    return engine
