"""``sqattn demo``: index the bundled sample documents with the embedded model and answer sample questions
dense (keep=1.0) and squeezed side by side, with sources, KV budget and timings."""

from __future__ import annotations

import json
import time

from .documents import DATA_DIR, sample_documents

__all__ = ["run_demo"]


def run_demo(keep: float = 0.2, max_new_tokens: int = 40, num_questions: int = 4, out=print,
             model: str | None = None) -> list[dict]:
    """Run the demo (``model``: default the embedded SmolLM2); returns one row per question (answers, budgets,
    timings)."""
    from .index import SqueezedKVIndex
    from .llm import SqueezedLLM

    t0 = time.perf_counter()
    llm = SqueezedLLM.from_pretrained(model)
    t_model = time.perf_counter() - t0
    docs = sample_documents()
    t1 = time.perf_counter()
    index = SqueezedKVIndex.from_documents(docs, llm=llm, show_progress=True)
    t_build = time.perf_counter() - t1
    corpus = index.vector_store.corpus
    out(f"model loaded in {t_model:.1f} s; indexed {len(docs)} documents ({corpus.num_tokens} tokens, "
        f"{corpus.num_layers} layers) in {t_build:.1f} s "
        f"(prefill {corpus.build_seconds.get('prefill', 0):.1f} s, clustering "
        f"{corpus.build_seconds.get('clustering', 0):.1f} s, calibration "
        f"{corpus.build_seconds.get('calibration', 0):.1f} s)")
    questions = json.loads((DATA_DIR / "demo_questions.json").read_text())[:num_questions]
    engines = {1.0: index.as_query_engine(keep=1.0, max_new_tokens=max_new_tokens),
               keep: index.as_query_engine(keep=keep, max_new_tokens=max_new_tokens)}
    rows = []
    for q in questions:
        out("")
        out(f"Q: {q['question']}   (expected: {q['answer']}, in {q['source']})")
        row = {"question": q["question"], "expected": q["answer"]}
        for k, engine in engines.items():
            t = time.perf_counter()
            response = engine.query(q["question"])
            seconds = time.perf_counter() - t
            meta = response.metadata or {}
            label = "dense   " if k == 1.0 else f"keep={k:<4}"
            top = response.source_nodes[0].node.metadata.get("file_name", "?") if response.source_nodes else "-"
            ok = q["answer"].lower() in str(response).lower()
            out(f"  {label} [{'ok' if ok else '--'}] {str(response).strip()[:110]}")
            out(f"           kv_budget {meta.get('kv_budget', float('nan')):.3f}   {seconds:.1f} s   top source: {top}")
            row[f"answer@{k}"] = str(response)
            row[f"correct@{k}"] = ok
            row[f"kv_budget@{k}"] = meta.get("kv_budget")
            row[f"seconds@{k}"] = seconds
        rows.append(row)
    out("")
    for k in engines:
        n_ok = sum(r[f"correct@{k}"] for r in rows)
        budget = sum(r[f"kv_budget@{k}"] or 0 for r in rows) / max(len(rows), 1)
        out(f"{'dense' if k == 1.0 else f'keep={k}'}: {n_ok}/{len(rows)} answers contain the expected fact, "
            f"mean KV budget {budget:.3f}")
    out(f"total demo time {time.perf_counter() - t0:.1f} s")
    return rows
