"""TPU readiness checks: graph hygiene per step, collective bytes from the lowered graph, traces.

On a TPU the price of a step is set by the XLA graph. A recompilation per step
(a shape or Python scalar that changes), an aten op that falls back to the host,
or a device-to-host read inside the step makes training many times slower than
the chip allows, and nothing else in the logs says so. ``GraphWatch`` reads
torch_xla's own counters (host-side: reading them syncs nothing) after every step
and reports what broke, and where. ``collectives`` parses the HLO a step lowers to
and counts what each all-gather / all-to-all / all-reduce moves. ``StepProfiler``
captures a profiler trace of a few steps (``--profile DIR``).
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import RunStopped, UserError
from .runtime import Runtime

GRAPH_CHECKS = ("warn", "error", "off")
# Diagnostics, not part of the experiment (a resumed run may change them), so they travel to
# the replicas as environment variables, set by ``launch --graph-check`` and ``--profile``.
GRAPH_CHECK_ENV, PROFILE_ENV = "MOCO_XLA_GRAPH_CHECK", "MOCO_XLA_PROFILE"


def graph_check_mode() -> str:
    """``warn`` (default), ``error`` or ``off``, from $MOCO_XLA_GRAPH_CHECK; UserError otherwise."""
    mode = os.environ.get(GRAPH_CHECK_ENV, "warn") or "warn"
    if mode not in GRAPH_CHECKS:
        raise UserError(f"{GRAPH_CHECK_ENV}={mode!r} (--graph-check); valid: {', '.join(GRAPH_CHECKS)}")
    return mode


class GraphHygieneError(RunStopped):
    """The step graph recompiled, fell back to the host or read a tensor back (--graph-check error).

    The launcher prints it as one ``error: ...`` line and exits 1.
    """


# rank -> the graph check of each replica thread of the rehearsal (its latest launch's)
_REPLICA_WATCHES: dict[int, "GraphWatch"] = {}


class GraphWatch:
    """Counts compilations, fallback ops and device-to-host transfers per step and per region.

    Rules (what a TPU performance engineer checks in the metrics report):
    - after ``warmup`` steps, a step compiles nothing (one graph, reused every step);
    - no aten op ever falls back to the host;
    - a step moves nothing device-to-host unless it (or the step before, whose step
      closures run when the next batch is fetched) was a log or checkpoint step;
    - a region outside the steps (``epoch_end``: epoch sums, kNN, checkpoint) compiles
      only the first time it runs.
    Off XLA the counters are empty and the watch does nothing.
    """

    def __init__(self, rt: Runtime, warmup: int = 3, mode: str | None = None) -> None:
        mode = graph_check_mode() if mode is None else mode
        if mode not in GRAPH_CHECKS:
            raise ValueError(f"graph check {mode!r}; valid: {', '.join(GRAPH_CHECKS)}")
        self.rt, self.warmup, self.mode = rt, warmup, mode
        # torch_xla's counters are process-wide. Where replicas are threads of one process only
        # compilations and fallbacks are checked (another thread's log read is not a leak). In the
        # rehearsal each replica thread counts the compilations it launched and watches its own
        # steps (the first one's report adds up all of them); on TPU v2/v3 the first watches for all.
        self.enabled = mode != "off" and (rt.first_in_process or rt.compiles_per_thread) and bool(rt.counters())
        self.check_transfers = rt.replicas_in_process == 1
        self.check_fallbacks = rt.first_in_process
        self.last = rt.counters() if self.enabled else {}
        self.steps = 0
        self.current = "train"
        self.visits: dict[str, int] = {"train": 1}
        self.prev_host_read = True
        self.kinds: set[str] = set()
        self.prev_first_of_kind = False
        self.compile_steps: list[list[int]] = []  # [step, compilations in its window]
        self.region_compiles: dict[str, list[int]] = {}  # region -> compilations per visit
        self.totals = {"compiles": 0, "compiles_after_warmup": 0, "fallback_ops": 0,
                       "unexpected_transfers": 0}
        self.violations: list[str] = []
        if self.enabled and rt.compiles_per_thread:
            _REPLICA_WATCHES[rt.rank] = self

    def step(self, log: bool = False, checkpoint: bool = False, poll: bool = False) -> None:
        """One training step has been queued; ``log``/``poll``/``checkpoint``: it also read values back.

        A poll or checkpoint step runs small graphs of its own (the stop check's gather); they
        compile the first time a step of that kind runs, and never again.
        """
        if not self.enabled:
            return
        self.steps += 1
        kind = ("log" if log else "") + ("+poll" if poll else "") + ("+checkpoint" if checkpoint else "")
        first_of_kind = kind not in self.kinds
        self.kinds.add(kind)
        host_read = bool(kind)
        d = self._delta()
        if d["compiles"]:
            self.compile_steps.append([self.steps, d["compiles"]])
        where = f"step {self.steps}"
        # A step's graph compiles when the next batch is fetched, i.e. in the next step's window.
        new_kind = first_of_kind or self.prev_first_of_kind
        self.prev_first_of_kind = first_of_kind
        if d["compiles"] and self.steps > self.warmup and not new_kind:
            self.totals["compiles_after_warmup"] += d["compiles"]
            self._violate(f"{where} compiled {d['compiles']} new graph(s) after the {self.warmup}-step "
                          f"warm-up: a shape or a Python scalar changes between steps")
        if self.check_transfers and d["transfers_from_device"] and not (host_read or self.prev_host_read):
            self.totals["unexpected_transfers"] += d["transfers_from_device"]
            self._violate(f"{where} moved {d['transfers_from_device']} tensor(s) device-to-host outside "
                          f"a log interval (.item(), .tolist(), .cpu(), float(t) or print in the step)")
        self.prev_host_read = host_read

    def enter(self, region: str) -> None:
        """Close the current region (checking it) and start a visit of ``region``."""
        if not self.enabled:
            return
        self._close()
        self.current = region
        self.visits[region] = self.visits.get(region, 0) + 1

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """A nested region (kNN, checkpoint); the enclosing one continues afterwards."""
        outer = self.current
        self.enter(name)
        try:
            yield
        finally:
            if self.enabled:
                self._close()
                self.current = outer

    def report(self) -> dict[str, Any]:
        """Totals for summary.json: all zero on a TPU-ready loop (except ``compiles``)."""
        if not self.enabled:
            return {}
        self._close()
        totals, violations, steps, regions = dict(self.totals), list(self.violations), {}, {}
        for watch in [self, *self._other_replicas()]:  # as counted so far by each replica thread
            if watch is not self:
                totals.update({k: totals[k] + watch.totals[k] for k in ("compiles", "compiles_after_warmup")})
                violations += [f"replica {watch.rt.rank}: {v}" for v in watch.violations]
            for step, n in watch.compile_steps:
                steps[step] = steps.get(step, 0) + n
            for region, per_visit in watch.region_compiles.items():
                merged = regions.setdefault(region, [])
                merged.extend([0] * (len(per_visit) - len(merged)))
                for i, n in enumerate(per_visit):
                    merged[i] += n
        return {**totals, "steps": self.steps, "compile_steps": [list(kv) for kv in sorted(steps.items())][:20],
                "region_compiles": {k: v[:10] for k, v in regions.items()},
                "fallback_op_names": self.rt.fallback_ops(), "violations": violations[:5]}

    def _other_replicas(self) -> list["GraphWatch"]:
        """The watches of this launch's other replica threads in this process (rehearsal only)."""
        if not self.rt.compiles_per_thread or not self.rt.first_in_process:
            return []
        ranks = range(self.rt.rank + 1, self.rt.rank + self.rt.replicas_in_process)
        return [_REPLICA_WATCHES[r] for r in ranks if r in _REPLICA_WATCHES]

    def _close(self) -> None:
        """End a window that is not a step: the tail of the steps, or a region's visit."""
        d = self._delta()
        visit = self.visits.get(self.current, 1)
        if self.current == "train":
            late = self.steps > self.warmup and not self.prev_first_of_kind
        else:
            late = visit > 1
            per_visit = self.region_compiles.setdefault(self.current, [])
            per_visit.extend([0] * (visit - len(per_visit)))
            per_visit[visit - 1] += d["compiles"]  # a visit may close in parts around nested regions
        if d["compiles"] and late:
            self.totals["compiles_after_warmup"] += d["compiles"]
            self._violate(f"{self.current} (visit {visit}, after step {self.steps}) compiled "
                          f"{d['compiles']} new graph(s); its graphs were compiled before")
        self.prev_host_read = True  # the next step may see this region's reads finish

    def _delta(self) -> dict[str, int]:
        now = self.rt.counters()
        d = {k: now[k] - self.last.get(k, 0) for k in now}
        self.last = now
        self.totals["compiles"] += d["compiles"]
        if d["fallback_ops"] and self.check_fallbacks:
            self.totals["fallback_ops"] += d["fallback_ops"]
            self._violate(f"{self.current} after step {self.steps}: ops fell back to the host "
                          f"({', '.join(self.rt.fallback_ops())}): each one is a device round trip")
        return d

    def _violate(self, message: str) -> None:
        self.violations.append(message)
        if self.mode == "error":
            raise GraphHygieneError(message)
        if len(self.violations) <= 3:
            hint = " (PT_XLA_DEBUG_LEVEL=2 names the cause; --graph-check off silences this)"
            warnings.warn(message + hint, RuntimeWarning, stacklevel=3)


# -- collectives in the lowered graph ---------------------------------------------

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+(all-gather|all-to-all|all-reduce|reduce-scatter|"
                 r"collective-permute)(?:-start)?\(([^)]*)\)")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


@dataclass
class Collective:
    op: str                   # all-gather | all-to-all | all-reduce | reduce-scatter | collective-permute
    shapes: list[str]         # operand types as in HLO, e.g. ["f32[16,1,16,16]"]
    operand_bytes: int        # what this replica puts in

    def received_bytes(self, world: int) -> int:
        """Bytes this replica receives at ``world`` replicas (ring algorithms for the reductions)."""
        n, b = world, self.operand_bytes
        if self.op == "all-gather":
            return (n - 1) * b
        if self.op in ("all-to-all", "reduce-scatter"):
            return (n - 1) * b // n
        if self.op == "all-reduce":
            return 2 * (n - 1) * b // n
        return b


def collectives(hlo: str) -> list[Collective]:
    """Every collective op in an HLO module text, with its operand shapes and bytes."""
    found = []
    for m in _OP.finditer(hlo):
        shapes = [(dt, dims) for dt, dims in _SHAPE.findall(m.group(2)) if dt in DTYPE_BYTES]
        size = sum(DTYPE_BYTES[dt] * _numel(dims) for dt, dims in shapes)
        found.append(Collective(m.group(1), [f"{dt}[{dims}]" for dt, dims in shapes], size))
    return found


def received_bytes(hlo: str, world: int, ops: tuple[str, ...] = ("all-gather", "all-to-all")) -> int:
    """Bytes one replica receives per run of the graph from the collectives ``ops``."""
    return sum(c.received_bytes(world) for c in collectives(hlo) if c.op in ops)


def _numel(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


# -- host memory and traces ------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class StepProfiler:
    """Traces steps ``start`` .. ``start + steps - 1`` into ``log_dir`` (TensorBoard's profile tab).

    Skips the first steps on purpose: they compile, and a trace of compilation hides the
    step. XLA uses torch_xla's profiler, CUDA/CPU torch.profiler (see Runtime.start_trace).
    """

    def __init__(self, rt: Runtime, log_dir: str | None = None, start: int = 3, steps: int = 5) -> None:
        log_dir = log_dir if log_dir is not None else os.environ.get(PROFILE_ENV) or None
        self.rt, self.start, self.steps = rt, start, steps
        self.dir = Path(log_dir) / f"rank{rt.rank}" if log_dir else None
        self.seen, self.running = 0, False

    def step(self) -> None:
        """Call once per training step, after the step is queued."""
        if self.dir is None:
            return
        self.seen += 1
        if self.seen == self.start and not self.running:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.rt.start_trace(str(self.dir))
            self.running = True
        elif self.running and self.seen >= self.start + self.steps:
            self.stop()

    def stop(self) -> None:
        """End the trace (also at the end of training, if fewer steps ran)."""
        if self.running:
            self.rt.mark_step()
            self.rt.wait()
            self.rt.stop_trace()
            self.running = False
