"""Run records on the master replica: metrics.jsonl, TensorBoard event files, PNG plots, summary.json.

Every record goes to ``<out>/metrics.jsonl`` (the source of truth, one JSON object
per line) and its numeric fields to TensorBoard as ``<type>/<field>`` scalars in
``<out>/tensorboard``. When the writer closes, ``plots.plot_run`` redraws the PNGs
in ``<out>/plots`` from metrics.jsonl, so the plots always show the whole run,
resumed parts included. With a ``mirror`` (records.py: checkpoint.dir on gs://) the
files are also copied to ``<checkpoint.dir>/records`` at log intervals, checkpoints, epoch
ends and on close, so every host of a pod slice and every resume find them.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import RecordsMirror

TB_DIR, PLOTS_DIR = "tensorboard", "plots"
NOT_SCALARS = ("type", "step", "epoch")


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; a no-op on non-master replicas."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 plots: bool = True, purge_step: int | None = None, mirror: RecordsMirror | None = None) -> None:
        """``purge_step``: a resumed run rewrites steps from there on; TensorBoard hides the old ones.
        ``mirror``: where the records are also copied (records.RecordsMirror), or None."""
        self.out = Path(out_dir)
        self.enabled, self.plots = enabled, plots
        self.mirror = mirror if enabled else None
        self._tb = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            self._f = open(self.out / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out / TB_DIR), purge_step=purge_step)

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        """One record; TensorBoard's x is ``step``, else the record's step, else its epoch."""
        if not self.enabled:
            return
        record = _clean(record)
        self._f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            x = step if step is not None else record.get("step", record.get("epoch", 0))
            for key, value in scalars(record).items():
                self._tb.add_scalar(f"{record.get('type', 'record')}/{key}", value, global_step=x)
        if self.mirror is not None:  # at log intervals: only once an interval has passed
            light, heavy = self.mirror.light_due(), self.mirror.heavy_due()
            if light or heavy:
                self._push(light, heavy)

    def sync(self) -> None:
        """Copy the records to the mirror now (after a checkpoint or an epoch's record); TensorBoard
        and plots only when their interval has passed. A no-op without a mirror."""
        if self.mirror is not None:
            self._push(light=True, heavy=self.mirror.heavy_due())

    def close(self) -> None:
        """Flush everything, redraw the plots from metrics.jsonl and copy it all to the mirror."""
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self.plots:
            self._draw_plots()
        if self.mirror is not None:
            self.mirror.push(light=True, heavy=True)

    def _push(self, light: bool, heavy: bool) -> None:
        """Flush the open files, redraw the plots when they go too, then upload."""
        self._f.flush()
        if self._tb is not None:
            self._tb.flush()
        if heavy and self.plots:
            self._draw_plots()
        self.mirror.push(light=light, heavy=heavy)

    def _draw_plots(self) -> None:
        try:
            from .plots import plot_run
            plot_run(self.out / PLOTS_DIR, read_metrics(self.out), read_summary(self.out))
        except Exception as e:  # a plot must never cost a run its exit code
            warnings.warn(f"could not draw plots in {self.out / PLOTS_DIR}: {e}", RuntimeWarning)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields (booleans as 0/1), minus its type, step and epoch."""
    out = {}
    for key, value in record.items():
        if key in NOT_SCALARS or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write (or update) ``<out>/summary.json``: keys from other commands are kept, nested dicts merged."""
    path = Path(out_dir) / "summary.json"
    old = read_summary(out_dir)
    _merge(old, _clean(summary))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl; a line cut short by a kill is skipped."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def lines_up_to(text: str, global_step: int) -> list[str]:
    """metrics.jsonl's whole lines whose step is at most ``global_step`` (a line cut by a kill dropped)."""
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= global_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    return keep


def trim_metrics(out_dir: Path, global_step: int) -> None:
    """Drop records past the resumed step (and a line cut by a kill): the rerun writes them again."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = lines_up_to(path.read_text(), global_step)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
