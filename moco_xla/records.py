"""A run's records copied beside its gs:// checkpoints, so that every host and every resume find them.

On a pod slice the replica with global ordinal 0 (the one that writes metrics.jsonl, summary.json,
TensorBoard and the plots into its local ``--out``) need not run on worker 0, and after a resume it
may run on another host, with an empty ``--out``. So when ``checkpoint.dir`` is remote, the master
replica keeps writing into its local ``--out`` exactly as on one host, and ``RecordsMirror`` copies
those files, whole and atomically (``storage.write_bytes``), to ``<checkpoint.dir>/records/``:

- metrics.jsonl, summary.json, config.yaml and ``host`` (the hostname that writes, which
  ``tpu_scripts/logs.sh`` uses to find the worker to follow): after every checkpoint and epoch
  record, at log intervals at most every ``LIGHT_EVERY_S``, and at the end;
- tensorboard/ and plots/ (larger, read only by people): at most every ``HEAVY_EVERY_S``, and at
  the end.

Only files that changed since their last upload are sent; uploads happen on the host between
steps, never in the step graph. A resumed run first takes metrics.jsonl and summary.json back
(``restore``), so its history and plots stay whole. A failed upload is a warning and is retried at
the next moment: the records never stop a run.
"""
from __future__ import annotations

import math
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

from .data import storage
from .errors import UserError
from .report import lines_up_to

RECORDS = "records"                                      # the folder inside checkpoint.dir
LIGHT_FILES = ("metrics.jsonl", "summary.json", "config.yaml")
HEAVY_DIRS = ("tensorboard", "plots")
HOST_FILE = "host"
LIGHT_EVERY_S = 60.0    # metrics.jsonl at log intervals: a minute behind at most
HEAVY_EVERY_S = 600.0   # TensorBoard event files grow all run long; plots take a second to draw


def records_url(checkpoint_dir: str | None) -> str | None:
    """``<checkpoint.dir>/records`` when the checkpoints are remote (gs://), else None (records stay local)."""
    if checkpoint_dir and storage.is_remote(checkpoint_dir):
        return storage.join(checkpoint_dir, RECORDS)
    return None


class RecordsMirror:
    """The master replica's copy of its local records (``local``) in a remote folder (``remote``)."""

    def __init__(self, local: str | Path, remote: str, light_every_s: float = LIGHT_EVERY_S,
                 heavy_every_s: float = HEAVY_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.local, self.remote = Path(local), remote
        self.light_every_s, self.heavy_every_s, self.clock = light_every_s, heavy_every_s, clock
        self._light_at, self._heavy_at = -math.inf, clock()  # metrics at the first log; the rest later
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) last uploaded

    def restore(self, global_step: int) -> bool:
        """Before a resumed run appends: take the remote metrics.jsonl and summary.json when the remote
        holds at least as many of the run's records up to ``global_step`` as the local ``--out`` (the
        writing host may have changed since, or this one lost its disk). True when they were taken."""
        try:
            remote = storage.read_bytes_or_none(storage.join(self.remote, "metrics.jsonl"))
            if remote is None:
                return False
            path = self.local / "metrics.jsonl"
            local = path.read_text() if path.exists() else ""
            if len(lines_up_to(remote.decode(), global_step)) < len(lines_up_to(local, global_step)):
                return False
            storage.write_bytes(str(path), remote)
            summary = storage.read_bytes_or_none(storage.join(self.remote, "summary.json"))
            if summary is not None:
                storage.write_bytes(str(self.local / "summary.json"), summary)
        except Exception as e:  # continuing would replace the remote history with this host's part
            raise UserError(f"cannot read the run's records in {self.remote} ({type(e).__name__}: "
                            f"{storage.first_line(e)}); check the bucket and resume again") from None
        return True

    def announce(self) -> None:
        """Name this host as the one writing the records (``tpu_scripts/logs.sh --ckpt`` follows it)."""
        self._upload_bytes(HOST_FILE, (socket.gethostname() + "\n").encode())

    def light_due(self) -> bool:
        return self.clock() - self._light_at >= self.light_every_s

    def heavy_due(self) -> bool:
        return self.clock() - self._heavy_at >= self.heavy_every_s

    def push(self, light: bool = True, heavy: bool = False) -> None:
        """Upload the changed files of the light group, the heavy group, or both."""
        now = self.clock()
        files: list[Path] = []
        if light:
            self._light_at = now
            files += [self.local / name for name in LIGHT_FILES]
        if heavy:
            self._heavy_at = now
            for d in HEAVY_DIRS:
                files += sorted(p for p in (self.local / d).rglob("*") if p.is_file())
        for path in files:
            self._upload_file(path)

    def _upload_file(self, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        rel = path.relative_to(self.local).as_posix()
        signature = (st.st_size, st.st_mtime_ns)
        if self._sent.get(rel) == signature:
            return
        if self._upload_bytes(rel, path.read_bytes()):
            self._sent[rel] = signature

    def _upload_bytes(self, rel: str, data: bytes) -> bool:
        url = storage.join(self.remote, rel)
        try:
            storage.write_bytes(url, data)
            return True
        except Exception as e:  # a storage hiccup: warn, retry at the next moment, keep training
            warnings.warn(f"could not upload {url} ({type(e).__name__}: {storage.first_line(e)}); "
                          f"retrying later", RuntimeWarning)
            return False
