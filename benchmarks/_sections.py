"""The section loop shared by the speed benchmarks: run each named section, write the result
files after every one, so an interrupted run keeps what it measured."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def run_sections(sections: Sequence[str], runners: Mapping[str, Callable[..., Any]], args: Any,
                 log: Callable[[str], None], result: dict[str, Any], out: Path,
                 to_markdown: Callable[[dict[str, Any]], str], start: float,
                 provenance: Mapping[str, Any] | None = None) -> None:
    """``result["sections"][name] = runners[name](args, log)`` for each name, with when it
    finished, the load average and ``provenance`` under ``result["provenance"][name]``;
    ``out.json`` and ``out.md`` rewritten after each section."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in sections:
        log(f"[{name}]")
        result["sections"][name] = runners[name](args, log)
        result.setdefault("provenance", {})[name] = {
            **(provenance or {}), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "load_average_1m": round(os.getloadavg()[0], 2)}
        result["wall_time_s"] = time.perf_counter() - start
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(result) + "\n")
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
