"""Input-pipeline rows: the loader benchmark (folder vs local vs GCS-emulator shards) or the
in-memory digits loader."""
from __future__ import annotations

import time
from typing import Any

def loader_rows(quick: bool, which: str = "auto") -> list[dict[str, Any]]:
    """Input pipeline images/s: ``shard_loaders.run(quick)`` (auto:
    folder vs local vs GCS-emulator shards, minutes), else the digits pre-training loader (the
    quickstart's two-view augmentation, seconds)."""
    if which == "off":
        return []
    if which == "auto":
        from .shard_loaders import run
        return [dict(r, suite="benchmarks/loader_bench.py") for r in run(quick)]
    return [digits_loader_row(16 if quick else 64, 4 if quick else 20)]


def digits_loader_row(batch: int, batches: int) -> dict[str, Any]:
    from .. import data
    from ..config import load_config
    cfg = load_config("tiny")
    bundle = data.build(cfg)
    loader = data.pretrain_loader(bundle.pretrain, batch, 0, 1, 0, 0, batches)
    t0 = time.perf_counter()
    n = sum(q.shape[0] for q, _k in loader)
    return {"source": "digits (in memory)", "workers": 0, "images_per_s": n / (time.perf_counter() - t0),
            "suite": "moco_xla.bench"}

