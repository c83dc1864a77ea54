"""Reading documents from files and folders for ``sqattn build`` and the examples."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

__all__ = ["read_documents", "sample_documents", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".pdf")
DATA_DIR = Path(__file__).parent / "data"


def _files(paths: list[str | Path]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ConfigError(f"{path} is not a supported document ({', '.join(SUPPORTED_SUFFIXES)}); "
                                  "convert it to text or markdown first.")
            found.append(path)
        else:
            raise ConfigError(f"{path} does not exist; give existing files or folders.")
    return found


def read_documents(paths: list[str | Path]):
    """llama_index ``Document``s of the given files and folders (recursively), ``file_name`` in metadata."""
    from llama_index.core import Document

    files = _files(paths)
    if not files:
        raise ConfigError(f"no readable documents ({', '.join(SUPPORTED_SUFFIXES)}) "
                          f"under {', '.join(map(str, paths))}; "
                          "point at a folder that holds text, markdown or PDF files.")
    docs = []
    for f in files:
        if f.suffix.lower() == ".pdf":
            docs += _read_pdf(f)
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(text=text, id_=str(f.resolve()), metadata={"file_name": f.name, "file_path": str(f)}))
    if not docs:
        raise ConfigError(f"the documents under {', '.join(map(str, paths))} are all empty; nothing to index.")
    return docs


def _read_pdf(path: Path):
    try:
        from llama_index.core.readers.file.base import SimpleDirectoryReader
        return SimpleDirectoryReader(input_files=[str(path)]).load_data()
    except ImportError as exc:  # pypdf missing
        raise ConfigError(f"reading {path} needs the pypdf package: pip install pypdf") from exc


def sample_documents():
    """The demo corpus shipped with the package (three invented documents with checkable facts)."""
    return read_documents([DATA_DIR])
