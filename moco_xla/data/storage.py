"""Local paths and gs:// URLs behind one fsspec interface: the storage of data, shards and checkpoints.

A path is remote when it is a gs:// (or gcs://) URL; any other scheme is refused by the checks
(``check_writable``), everything else is a local path. gcsfs specifics live here so nothing else
has to know them:
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` defaults to false before gcsfs is imported:
  its zonal/HNS bucket probing stalls on emulators and plain buckets need none of it
  (set it to true yourself for zonal buckets);
- under ``STORAGE_EMULATOR_HOST`` (fake-gcs-server) requests are anonymous;
  otherwise gcsfs finds credentials itself (the TPU VM's service account);
- gcsfs is not fork-safe: call ``filesystem`` lazily in each DataLoader worker
  (fsspec drops instances cached by another process id).
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import UserError

REMOTE_PREFIXES = ("gs://", "gcs://")
GCS_TIMEOUT_S = float(os.environ.get("MOCO_XLA_GCS_TIMEOUT", "20"))  # a bucket check's longest wait


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE_PREFIXES)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local path or gs:// URL."""
    import fsspec
    url = str(url) if is_remote(url) else os.path.expanduser(str(url))
    opts: dict = {}
    if is_remote(url):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            opts["token"] = "anon"
    return fsspec.core.url_to_fs(url, **opts)


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def bucket_of(url: str) -> str:
    return str(url).split("://", 1)[1].split("/", 1)[0]


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_bytes_or_none(url: str) -> bytes | None:
    """The file's bytes, or None when there is no such file (other errors raise)."""
    try:
        return read_bytes(url)
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data)  # a GCS object becomes visible only when its upload completes
        return
    path_ = Path(os.path.expanduser(str(url)))
    path_.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_.with_name(f".{path_.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path_)
    fd = os.open(path_.parent, os.O_RDONLY)  # make the rename itself durable (power loss)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_stream(url: str, block_size: int = 8 << 20):
    """A file object for sequential reads.

    Remote files are read in ``block_size`` range requests, the next block fetched in a
    background thread while the current one is parsed and decoded (fsspec's
    "background" cache; two blocks in memory at most).
    """
    fs, path = filesystem(url)
    if is_remote(url):
        return fs.open(path, "rb", block_size=block_size, cache_type="background",
                       cache_options={"maxblocks": 2})
    return fs.open(path, "rb")


# ----------------------------------------------------------------------------- checks

def check_writable(directory: str, what: str = "checkpoint.dir") -> None:
    """Fail fast (before replicas start) on a directory that cannot be written: local, or a gs:// bucket."""
    if "://" in str(directory):
        check_bucket(directory, what)
        return
    d = Path(directory)
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {directory}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise UserError(f"{what} {directory} is not writable ({probe} denies writing)")


def check_bucket(url: str, what: str = "data.root") -> None:
    """A reachable endpoint and an existing bucket, answered in seconds, not after gcsfs's retries."""
    parsed = urlparse(url)
    if parsed.scheme not in ("gs", "gcs"):
        raise UserError(f"{what} {url}: only local paths and gs:// URLs are supported")
    if not parsed.netloc:
        raise UserError(f"{what} {url} names no bucket; use gs://BUCKET/PREFIX")
    host, port = _gcs_endpoint()
    try:
        socket.create_connection((host, port), timeout=min(GCS_TIMEOUT_S, 10)).close()
    except OSError as e:
        raise UserError(f"{what} {url} is unreachable: cannot connect to the storage endpoint "
                        f"{host}:{port} ({e.strerror or e})") from None
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            fs, _ = filesystem(url)
            result["ok"] = fs.exists(parsed.netloc)
        except Exception as e:  # auth or HTTP errors: reported below, one line
            result["error"] = f"{type(e).__name__}: {_first_line(e)}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(GCS_TIMEOUT_S)
    if t.is_alive():
        raise UserError(f"{what} {url} is unreachable: no answer from {host}:{port} in "
                        f"{GCS_TIMEOUT_S:.0f} s")
    if "error" in result:
        raise UserError(f"{what} {url} is not accessible ({result['error']})")
    if not result.get("ok"):
        raise UserError(f"{what} {url}: bucket gs://{parsed.netloc} does not exist or is not accessible "
                        f"with these credentials")


def _gcs_endpoint() -> tuple[str, int]:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        u = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return u.hostname or "localhost", u.port or (443 if u.scheme == "https" else 80)
    return "storage.googleapis.com", 443


def first_line(e: BaseException) -> str:
    """An exception's first line, for one-line messages."""
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
