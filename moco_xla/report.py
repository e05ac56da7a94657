"""Run records on the master replica: metrics.jsonl (step and epoch records) and summary.json."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends one JSON object per line to ``<out>/metrics.jsonl``; a no-op on non-master replicas."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.out = Path(out_dir)
        self.enabled = enabled
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            self._f = open(self.out / "metrics.jsonl", "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._f.write(json.dumps(_clean(record)) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write (or update) ``<out>/summary.json``; keys already there from other commands are kept."""
    path = Path(out_dir) / "summary.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(_clean(summary))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
