"""Chat with a folder of documents over their squeezed KV cache.

    python examples/chatbot.py FOLDER [--store DIR] [--keep 0.1] [--max-new-tokens 256] [--model M]

The first run encodes FOLDER (its .md / .txt files) once and persists the index under FOLDER/.sqattn (or
--store); later runs reload it in about a second, re-encoding only documents that changed. Answers stream
with their top sources. Reads questions from stdin, so it also runs piped:

    printf 'Who ground the mirror?\\n/sources\\n/quit\\n' | python examples/chatbot.py sqattn_index/data

Commands: /sources (sources of the last answer), /keep 0.2 (fraction of the KV attended), /reset (forget the
conversation), /quit. Runs offline on the embedded default model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama_index.core import SimpleDirectoryReader

import sqattn_index as sq


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="folder of .md / .txt documents")
    p.add_argument("--store", type=Path, default=None, help="index directory (default: FOLDER/.sqattn)")
    p.add_argument("--keep", type=float, default=0.1, help="fraction of the corpus KV attended (1.0 = dense)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--rebuild", action="store_true", help="re-encode the folder even if an index exists")
    return p.parse_args(argv)


def read_documents(folder: Path):
    if not folder.is_dir():
        sys.exit(f"error: {folder} is not a folder of documents")
    reader = SimpleDirectoryReader(str(folder), required_exts=[".md", ".txt"], filename_as_id=True, recursive=True)
    return reader.load_data()


def open_index(args, llm, docs):
    """Reload the persisted index (refreshing changed documents) or build and persist a new one."""
    store = args.store or args.folder / ".sqattn"
    if store.exists() and not args.rebuild:
        t0 = time.perf_counter()
        index = sq.load_index(store, llm=llm)
        current = {d.id_ for d in docs}
        gone = [ref for ref in index.ref_doc_info if ref not in current]
        for ref in gone:
            index.delete_ref_doc(ref, delete_from_docstore=True)
        changed = sum(index.refresh_ref_docs(docs)) + len(gone)
        if changed:
            index.storage_context.persist(str(store))
        print(f"[loaded {store} in {time.perf_counter() - t0:.1f}s; {changed} document(s) updated]", flush=True)
        return index
    t0 = time.perf_counter()
    index = sq.SqueezedKVIndex.from_documents(docs, llm=llm, show_progress=sys.stderr.isatty())
    index.storage_context.persist(str(store))
    tokens = index.vector_store.corpus.num_tokens
    print(f"[encoded {len(docs)} document(s), {tokens} tokens, in {time.perf_counter() - t0:.1f}s; "
          f"saved to {store}]", flush=True)
    return index


def describe(node_with_score, width: int = 70) -> str:
    node = node_with_score.node
    name = node.metadata.get("file_name") or node.ref_doc_id or node.node_id
    snippet = " ".join(node.get_content().split())[:width]
    return f"{name} (lift {node_with_score.score:.2f}): {snippet}..."


def main(argv=None) -> int:
    args = parse_args(argv)
    docs = read_documents(args.folder)
    if not docs:
        sys.exit(f"error: no .md or .txt files in {args.folder}")
    llm = sq.SqueezedLLM.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    index = open_index(args, llm, docs)
    chat = index.as_chat_engine(keep=args.keep, max_new_tokens=args.max_new_tokens)
    print("Ask about the documents. Commands: /sources /keep F /reset /quit", flush=True)
    last_sources = []
    for line in sys.stdin:
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            break
        if message == "/sources":
            print("\n".join(describe(s) for s in last_sources) or "(no answer yet)", flush=True)
            continue
        if message == "/reset":
            chat.reset()
            print("[conversation cleared]", flush=True)
            continue
        if message.startswith("/keep"):
            try:
                chat.keep = float(message.split()[1])
                print(f"[keep = {chat.keep}]", flush=True)
            except (IndexError, ValueError) as exc:
                print(f"[usage: /keep 0.2 ({exc})]", flush=True)
            continue
        print(f"> {message}", flush=True)
        response = chat.stream_chat(message)
        for delta in response.response_gen:
            print(delta, end="", flush=True)
        print()
        last_sources = response.source_nodes
        meta = response.metadata
        names = ", ".join(dict.fromkeys(s.node.metadata.get("file_name", "?") for s in last_sources[:3]))
        print(f"[sources: {names} | KV budget {meta['kv_budget']:.2f} | {meta['seconds']['total']:.1f}s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
