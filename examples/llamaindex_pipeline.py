"""The squeezed KV index inside an ordinary LlamaIndex pipeline.

    python examples/llamaindex_pipeline.py [FOLDER] [--question Q] [--keep 0.1] [--max-new-tokens 64]

1. An ``IngestionPipeline`` chunks the documents with a ``SentenceSplitter`` that counts the model's own tokens.
2. ``SqueezedKVIndex`` encodes the nodes once into a clustered KV cache.
3. Two ways to answer:
   - the index's own query engine attends sparsely to the whole cached corpus (no retrieval step);
   - ``as_retriever`` ranks nodes by the attention the question puts on them and feeds a standard
     ``RetrieverQueryEngine.from_args(retriever, llm=llm)``, which pastes the top nodes into a dense prompt.

No OpenAI defaults are touched: the LLM is passed explicitly and no embeddings are used. Runs offline on
the embedded default model; FOLDER defaults to the demo documents shipped with sqattn_index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_index.core import Settings, SimpleDirectoryReader
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine

import sqattn_index as sq
from sqattn_index.node_parsing import HFTokenIds

DEMO = Path(sq.__file__).parent / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, nargs="?", default=DEMO, help="folder of .md / .txt files (default: demo)")
    p.add_argument("--question", default=None, help="question (default: the first demo question)")
    p.add_argument("--keep", type=float, default=0.1, help="fraction of the corpus KV attended (1.0 = dense)")
    p.add_argument("--top-k", type=int, default=2, help="nodes the retriever passes to RetrieverQueryEngine")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per node")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def default_question(folder: Path) -> str:
    questions = folder / "demo_questions.json"
    if questions.is_file():
        return json.loads(questions.read_text())[0]["question"]
    return "What are these documents about?"


def show(title: str, response) -> None:
    print(f"\n== {title}\n{response.response.strip()}")
    for s in response.source_nodes:
        name = s.node.metadata.get("file_name", s.node.ref_doc_id)
        print(f"   source: {name}  score {s.score:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    question = args.question or default_question(args.folder)
    docs = SimpleDirectoryReader(str(args.folder), required_exts=[".md", ".txt"]).load_data()
    llm = sq.SqueezedLLM.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens)

    # 1. chunking: a SentenceSplitter measuring the model's own tokens, no overlap
    splitter = SentenceSplitter(chunk_size=args.chunk_size, chunk_overlap=0, tokenizer=HFTokenIds(llm.local.tokenizer))
    nodes = IngestionPipeline(transformations=[splitter]).run(documents=docs)
    print(f"{len(docs)} document(s) -> {len(nodes)} node(s)")

    # 2. one prefill + clustering of the whole corpus
    index = sq.SqueezedKVIndex(nodes, llm=llm, transformations=[splitter])
    print(f"corpus: {index.vector_store.corpus.num_tokens} tokens; question: {question}")

    # 3a. sparse attention over the whole cached corpus
    show(f"SqueezedKVIndex.as_query_engine(keep={args.keep})", index.as_query_engine(keep=args.keep).query(question))

    # 3b. attention-ranked retrieval feeding a standard LlamaIndex query engine
    retriever = index.as_retriever(similarity_top_k=args.top_k)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)
    show(f"RetrieverQueryEngine over as_retriever(similarity_top_k={args.top_k})", engine.query(question))

    if Settings._llm is not None or Settings._embed_model is not None:
        sys.exit("error: a LlamaIndex default model (OpenAI) was resolved")
    print("\nSettings.llm / Settings.embed_model were never resolved.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
