"""Loader throughput: image folder vs local shards vs shards streamed from GCS (the local emulator).

    python benchmarks/loader_bench.py            # full: 1,024 JPEGs of 256x256, best of 2 runs
    python benchmarks/loader_bench.py --quick    # seconds: 384 JPEGs
    python benchmarks/loader_bench.py --json out.json

A thin entry: the benchmark lives in moco_xla.bench.shard_loaders (also run by
``python -m moco_xla.bench``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moco_xla.bench.shard_loaders import main, run, table  # noqa: E402

__all__ = ["main", "run", "table"]

if __name__ == "__main__":
    sys.exit(main())
