"""Shared plumbing for the benchmark scripts: corpora location, cached datastores, tables."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
CORPORA = Path(os.environ.get("KNNLM_CORPORA", HERE.parent.parent / "shared" / "corpora"))


def corpus_file(name: str, split: str) -> Path:
    path = CORPORA / name / f"{split}.txt"
    if not path.is_file():
        raise SystemExit(f"benchmark corpus not found: {path} (set KNNLM_CORPORA to the corpora folder)")
    return path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("faiss.loader", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_systems(text: str, known: tuple[str, ...]) -> list[str]:
    """``--systems a,b`` -> ``["a", "b"]``, refusing names the benchmark does not know."""
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(known))
    if unknown:
        raise SystemExit(f"unknown --systems {', '.join(unknown)}; choose from {', '.join(known)}")
    return systems


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("–" if v is None else format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a CI timeout) unwinds like Ctrl-C, so ``finally`` blocks and atexit hooks
    stop the Milvus server a benchmark started instead of leaving it running."""
    signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(*_) -> None:
    raise KeyboardInterrupt
