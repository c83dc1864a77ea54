"""Merge the result files of several benchmark runs into one table, as ``sqattn bench --append`` does: a row of a
later file replaces the row of an earlier one with the same (phase, shape, context, keep). Every row is tagged
with ``--tag key=value`` pairs (e.g. the session and the selection mode), and the speedup plot is redrawn from
the merged rows (``bench.plot``).

    python benchmarks/merge_results.py OUT.json FILE.json [FILE.json ...] [--tag session=9 --tag selection=threshold]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(files: list[Path], tags: dict) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for f in files:
        for r in json.loads(f.read_text()):
            r = {**r, **{k: v for k, v in tags.items() if k not in r}}
            rows[(r["phase"], r["shape"], r.get("context"), r.get("keep"))] = r
    return list(rows.values())


def main() -> None:
    from sqattn_index.bench import plot

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--tag", action="append", default=[], help="key=value added to rows that lack the key")
    ap.add_argument("--plot", type=Path, default=None, help="speedup plot path (default: beside OUT)")
    a = ap.parse_args()
    tags = {}
    for t in a.tag:
        k, _, v = t.partition("=")
        tags[k] = int(v) if v.isdigit() else v
    rows = merge(a.files, tags)
    a.out.write_text(json.dumps(rows, indent=1))
    plotted = [r for r in rows if r.get("device")]
    if plot(plotted, a.plot or a.out.with_name("speedup.png")):
        print(f"wrote {a.plot or a.out.with_name('speedup.png')}")
    print(f"wrote {a.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
