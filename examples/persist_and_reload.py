"""Build a squeezed KV index, persist it, reload it two ways and check the answers agree.

    python examples/persist_and_reload.py [FOLDER] [--store DIR] [--question Q] [--max-new-tokens 32]

The persisted directory holds LlamaIndex's docstore / index store JSON next to ``sqattn_kv/``: a SQLite
metadata database and one safetensors file per layer (written atomically, verified on load). Reloading
reads the KV cache instead of recomputing it. Runs offline on the embedded default model; FOLDER defaults
to the demo documents shipped with sqattn_index.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from llama_index.core import SimpleDirectoryReader, StorageContext, load_index_from_storage

import sqattn_index as sq

DEMO = Path(sq.__file__).parent / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, nargs="?", default=DEMO, help="folder of .md / .txt files (default: demo)")
    p.add_argument("--store", type=Path, default=None, help="where to persist (default: a temporary directory)")
    p.add_argument("--question", default=None, help="question (default: the first demo question)")
    p.add_argument("--keep", type=float, default=0.1, help="fraction of the corpus KV attended (1.0 = dense)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per answer")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def ask(index, question: str, keep: float) -> str:
    response = index.as_query_engine(keep=keep).query(question)
    top = response.source_nodes[0].node.metadata.get("file_name", "?") if response.source_nodes else "-"
    print(f"   answer: {response.response.strip()!r}  (top source {top}, KV budget "
          f"{response.metadata['kv_budget']:.2f})")
    return response.response


def run(args, store: Path) -> bool:
    question = args.question
    if question is None:
        demo = args.folder / "demo_questions.json"
        question = json.loads(demo.read_text())[0]["question"] if demo.is_file() else "What is this about?"
    docs = SimpleDirectoryReader(str(args.folder), required_exts=[".md", ".txt"]).load_data()
    llm = sq.SqueezedLLM.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens)

    t0 = time.perf_counter()
    index = sq.SqueezedKVIndex.from_documents(docs, llm=llm)
    print(f"built: {index.vector_store.corpus.num_tokens} tokens in {time.perf_counter() - t0:.1f}s")
    print(f"question: {question}")
    first = ask(index, question, args.keep)

    t0 = time.perf_counter()
    index.storage_context.persist(str(store))
    files = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    print(f"persisted to {store} in {time.perf_counter() - t0:.1f}s: {files}")

    t0 = time.perf_counter()  # the standard LlamaIndex route, with the KV store passed like any external store
    context = StorageContext.from_defaults(persist_dir=str(store),
                                           vector_store=sq.SqueezedKVStore.from_persist_dir(store))
    reloaded = load_index_from_storage(context, llm=llm)
    print(f"load_index_from_storage: {time.perf_counter() - t0:.1f}s")
    second = ask(reloaded, question, args.keep)

    t0 = time.perf_counter()  # the one-liner
    third = ask(sq.load_index(store, llm=llm), question, args.keep)
    print(f"sq.load_index: {time.perf_counter() - t0:.1f}s (load + answer)")

    same = first == second == third
    print(f"same answer after reload: {same}")
    return same


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.store is not None:
        return 0 if run(args, args.store) else 1
    with tempfile.TemporaryDirectory() as tmp:
        return 0 if run(args, Path(tmp) / "storage") else 1


if __name__ == "__main__":
    sys.exit(main())
