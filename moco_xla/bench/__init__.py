"""``python -m moco_xla.bench``: how close MoCo runs to the hardware, as ratios that travel.

    python -m moco_xla.bench --backend cpu,xla          # this machine: CPU eager and XLA:CPU
    python -m moco_xla.bench --backend xla              # a TPU VM: one TPU core
    python -m moco_xla.bench --backend cuda             # a GPU box: ResNet-50, 224 px, AMP
    python -m moco_xla.bench --quick --out /tmp/b       # seconds: tiny model (tests)
    python -m moco_xla.bench fewlabels --config digits_fewlabels --labels 50,100,250 --draws 0,1,2
                                                        # the few-label study, pre-training to table

Absolute images/s say more about the machine than about the code, so the headline
is a ratio on the same encoder, batch, precision and backend: MoCo step images/s
over a supervised step's. MoCo runs the encoder forward twice (query and key) and
backward once, a supervised step forward and backward once; with a backward pass
costing about two forwards the physical limit is 3/4 = 0.75. What the code adds on
top (shuffle BN, momentum update, queue) shows as the gap below 0.75.

Also measured: XLA compilations and host fallbacks after warm-up (goal 0 and 0),
peak host and device memory, the input pipeline's images/s against the step's,
and the bytes each shuffle-BN mode moves per step, counted from the shapes and
read from the lowered XLA graph. Results go to ``<out>/bench.json``.

The package, one job per module: ``steps`` (the step workloads and their timing, one
process per backend), ``official`` (the side by side with facebookresearch/moco under
DDP, started through runtime.replicas), ``loader`` and ``shard_loaders`` (input-pipeline
rows), ``cli`` (flags, table, bench.json), ``fewlabels`` (the few-label study end to end).
"""
from __future__ import annotations

from .cli import main, official_line, parse_args, run, table
from .official import comparison_for, moco_xla_step, official_step, run_comparison
from .steps import Workload, bench_backend, workload_for

__all__ = ["Workload", "bench_backend", "comparison_for", "main", "moco_xla_step", "official_line", "official_step",
           "parse_args", "run", "run_comparison", "table", "workload_for"]
