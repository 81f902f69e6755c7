#!/usr/bin/env python3
"""Print the Hydra overrides of the fastest FReP Lightning row (``pl-fast-bf16[-cw|-s2|-cm|...]``) of a
bench JSON, e.g. ``fast.streams=2``; nothing for the base variant or when no such row was timed.

Used by ``experiments/gpu/fast_path.sh`` to run the end-to-end recipe with what the step bench found fastest.
Usage: python experiments/gpu/fastest_variant.py bench-<device>-<date>-steps.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# mode-name suffix -> the fast.* override it stands for (experiments/bench.py: fast_options)
SUFFIXES = {"cw": "fast.cache_weights=true", "cm": "fast.compile_model=true", "s2": "fast.streams=2"}


def fastest(rows: list[dict], check: dict | None = None) -> tuple[str, float] | None:
    """The fastest FReP Lightning row that ran as asked (no fallback) and, for two-stream rows, whose
    replays the capture check found equal to the eager step (the check's FAIL leaves one-stream rows only)."""
    streams_ok = check is None or check.get("result") == "PASS"
    timed = [
        (r["mode"], r["ms"])
        for r in rows
        if r["method"] == "frep"
        and r["mode"].startswith("pl-fast")
        and r["ms"]
        and "fallback" not in r.get("note", "")
        and (streams_ok or "s2" not in r["mode"].split("-"))
    ]
    return min(timed, key=lambda t: t[1]) if timed else None


def overrides(mode: str) -> list[str]:
    return [SUFFIXES[t] for t in mode.split("-") if t in SUFFIXES]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    bench = json.loads(Path(argv[0]).read_text())
    if bench.get("check") and bench["check"].get("result") != "PASS":
        print(f"capture check: {bench['check'].get('result')}: two-stream rows left out", file=sys.stderr)
    best = fastest(bench["rows"], bench.get("check"))
    if best is None:
        print("no pl-fast row timed: the e2e runs the base fast path", file=sys.stderr)
        return 0
    print(f"fastest Lightning row: {best[0]} ({best[1]:.2f} ms/step)", file=sys.stderr)
    print(" ".join(overrides(best[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
