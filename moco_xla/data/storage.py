"""Local paths and gs:// URLs behind one fsspec interface.

gcsfs specifics live here so nothing else has to know them:
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

from ..errors import UserError

REMOTE_PREFIXES = ("gs://", "gcs://")


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


def check_bucket(url: str) -> None:
    """UserError unless the bucket of a gs:// URL exists and is readable."""
    fs, _ = filesystem(url)
    bucket = bucket_of(url)
    try:
        ok = fs.exists(bucket)
    except Exception as e:  # auth or network failures: say which bucket and why
        raise UserError(f"cannot reach bucket gs://{bucket} ({type(e).__name__}: {_first_line(e)})") from None
    if not ok:
        raise UserError(f"bucket gs://{bucket} does not exist or is not readable with these credentials "
                        f"(data.root={url})")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if not is_remote(url):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
