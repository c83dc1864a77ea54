"""Reading and writing one index generation's rows (manifest, documents, nodes, layers) through SQLAlchemy.

The in-directory database (``index.sqlite``) is written by the writer into the new generation's
directory and opened read-only and immutable by readers (a committed generation never changes, so
SQLite needs no locks or journal files and never writes into the index directory).
An external database (``db_url``) holds many generations side by side, keyed by ``index_uid``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from .records import DocumentRecord, IndexManifest, NodeRecord
from .schema import Base, DocumentRow, IndexInfoRow, LayerRow, NodeRow, make_engine
from .tensor_files import FileDigest

__all__ = ["DB_FILE", "GenerationRows", "LayerInfo", "local_writer_engine", "local_reader_engine",
           "external_engine", "masked_url", "write_generation", "read_generation", "delete_stale_generations"]

DB_FILE = "index.sqlite"


@dataclass
class LayerInfo:
    """One ``layers`` row: tensor file digest, clusters per KV head, thresholds per keep fraction."""

    layer: int
    file: FileDigest
    num_fine: int
    num_coarse: int
    thresholds: list  # [{"keep": k, "fine": [Hk], "coarse": [Hk]}, ...]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "file": asdict(self.file), "num_fine": self.num_fine,
                "num_coarse": self.num_coarse, "thresholds": self.thresholds}


@dataclass
class GenerationRows:
    """Everything one generation keeps in the database."""

    uid: str
    manifest: IndexManifest
    documents: list[DocumentRecord]
    nodes: list[NodeRecord]
    corpus_file: FileDigest
    layers: list[LayerInfo]

    def sha256(self) -> str:
        """Checksum of the rows' canonical JSON; recorded in the commit marker, checked on load."""
        payload = {
            "uid": self.uid, "manifest": self.manifest.to_dict(),
            "documents": [asdict(d) for d in self.documents], "nodes": [asdict(n) for n in self.nodes],
            "corpus_file": asdict(self.corpus_file), "layers": [info.to_dict() for info in self.layers],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def local_writer_engine(path: Path) -> Engine:
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(str(path)))


def local_reader_engine(path: Path) -> Engine:
    # SQLite URI: read-only and immutable (a committed generation never changes: no locks, no journal files)
    uri = f"file:{quote(str(path))}?mode=ro&immutable=1"
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True))


def external_engine(url: str) -> Engine:
    return make_engine(url, wal=True)


def masked_url(url: str) -> str:
    """``url`` with its password hidden, for messages and the commit marker."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as a placeholder
        return "<unparsable database URL>"


def write_generation(engine: Engine, rows: GenerationRows, directory: Path) -> None:
    """Create the tables if needed and insert one generation's rows in one transaction."""
    Base.metadata.create_all(engine)
    m = rows.manifest
    with Session(engine) as session, session.begin():
        session.add(IndexInfoRow(
            index_uid=rows.uid, directory=str(directory), format_version=m.format_version,
            created_at=m.created_at, model_id=m.model_id, model_fingerprint=m.model_fingerprint,
            tokenizer_fingerprint=m.tokenizer_fingerprint, dtype=m.dtype, num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, num_tokens=m.num_tokens,
            sink_tokens=m.sink_tokens, window_tokens=m.window_tokens, keep_ladder=list(m.keep_ladder),
            config=m.config, layout=m.layout, extra=m.extra, corpus_file=rows.corpus_file.name,
            corpus_sha256=rows.corpus_file.sha256, corpus_bytes=rows.corpus_file.num_bytes,
        ))
        session.add_all(DocumentRow(
            index_uid=rows.uid, ordinal=i, ref_doc_id=d.ref_doc_id, meta=d.metadata, text_hash=d.text_hash,
            token_start=d.token_start, token_end=d.token_end) for i, d in enumerate(rows.documents))
        session.add_all(NodeRow(
            index_uid=rows.uid, position=n.position, node_id=n.node_id, ref_doc_id=n.ref_doc_id, text=n.text,
            meta=n.metadata, token_start=n.token_start, token_end=n.token_end) for n in rows.nodes)
        session.add_all(LayerRow(
            index_uid=rows.uid, layer=info.layer, file_name=info.file.name, sha256=info.file.sha256,
            num_bytes=info.file.num_bytes, num_fine=info.num_fine, num_coarse=info.num_coarse,
            thresholds=info.thresholds) for info in rows.layers)


def read_generation(engine: Engine, uid: str) -> GenerationRows | None:
    """The rows of generation ``uid`` (None when there is no such generation)."""
    with Session(engine) as session:
        info = session.get(IndexInfoRow, uid)
        if info is None:
            return None
        docs = session.scalars(select(DocumentRow).where(DocumentRow.index_uid == uid)
                               .order_by(DocumentRow.ordinal)).all()
        nodes = session.scalars(select(NodeRow).where(NodeRow.index_uid == uid).order_by(NodeRow.position)).all()
        layers = session.scalars(select(LayerRow).where(LayerRow.index_uid == uid).order_by(LayerRow.layer)).all()
        manifest = IndexManifest(
            format_version=info.format_version, created_at=info.created_at, model_id=info.model_id,
            model_fingerprint=info.model_fingerprint, tokenizer_fingerprint=info.tokenizer_fingerprint,
            dtype=info.dtype, num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
            num_tokens=info.num_tokens, sink_tokens=info.sink_tokens, window_tokens=info.window_tokens,
            keep_ladder=tuple(info.keep_ladder), config=info.config, layout=info.layout, extra=info.extra,
        )
        return GenerationRows(
            uid=uid, manifest=manifest,
            documents=[DocumentRecord(ref_doc_id=d.ref_doc_id, metadata=d.meta, text_hash=d.text_hash,
                                      token_start=d.token_start, token_end=d.token_end) for d in docs],
            nodes=[NodeRecord(node_id=n.node_id, ref_doc_id=n.ref_doc_id, text=n.text, metadata=n.meta,
                              token_start=n.token_start, token_end=n.token_end, position=n.position)
                   for n in nodes],
            corpus_file=FileDigest(info.corpus_file, info.corpus_sha256, info.corpus_bytes),
            layers=[LayerInfo(layer=r.layer, file=FileDigest(r.file_name, r.sha256, r.num_bytes),
                              num_fine=r.num_fine, num_coarse=r.num_coarse, thresholds=r.thresholds)
                    for r in layers],
        )


def delete_stale_generations(engine: Engine, directory: Path, keep_uid: str) -> None:
    """Delete every generation of ``directory`` except ``keep_uid`` (old and crashed ones)."""
    with Session(engine) as session, session.begin():
        stale = session.scalars(select(IndexInfoRow.index_uid).where(
            IndexInfoRow.directory == str(directory), IndexInfoRow.index_uid != keep_uid)).all()
        if not stale:
            return
        for table in (DocumentRow, NodeRow, LayerRow, IndexInfoRow):
            session.execute(delete(table).where(table.index_uid.in_(stale)))
