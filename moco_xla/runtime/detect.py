"""Is a TPU attached, and can a TPU runtime start here? Answered in seconds, without importing one.

Both TPU runtimes have failure modes that a plain ``import`` or a first tensor turns into a
hang or a dead process: torch_xla's device count asks the GCE metadata server with no
timeout, importing torch with torch_tpu installed but no libtpu exits the process, and with
libtpu but no reachable metadata server the first TPU tensor waits forever. So detection
reads only files (the PCI bus under ``/sys``, ``/dev/accel*``, ``/dev/vfio``), package specs
(``importlib.util.find_spec``) and, only when chips are visible, the metadata server with a
timeout of a few seconds. ``root`` points all of it at a fake tree in tests.

When chips are visible but no runtime can start, ``tpu_runtime_problem`` says why in one line
and what to do: ``--backend auto`` then stops with that line instead of training on the CPU.
"""
from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device id -> TPU generation (torch_xla/_internal/tpu.py lists the same ids).
TPU_PCI_DEVICES = {
    "0x0027": "v2/v3",
    "0x005e": "v4",
    "0x0063": "v5e",
    "0x0062": "v5p",
    "0x006f": "v6e",
    "0x0076": "7x",
    "0x0056": "test",
}
CORES_PER_CHIP = {"v2/v3": 2}  # every later generation: one device per chip (megacore)
METADATA_URL = "http://169.254.169.254/computeMetadata/v1/instance/attributes/accelerator-type"
METADATA_TIMEOUT_S = 3.0
# Set, the TPU runtime reads the topology from TPU_* variables, not from the metadata server.
SKIP_METADATA_ENV = "TPU_SKIP_MDS_QUERY"


@dataclass(frozen=True)
class TpuChips:
    """What this host shows of TPU chips without starting anything."""

    generations: tuple[str, ...]  # one per Google TPU function on the PCI bus
    device_files: tuple[str, ...]  # /dev/accel* and /dev/vfio/N

    @property
    def visible(self) -> bool:
        return bool(self.generations or self.device_files)

    @property
    def count(self) -> int:
        """Chips on the PCI bus (device files alone do not say how many)."""
        return len(self.generations)

    @property
    def devices(self) -> int:
        """Runtime devices of this host: chips, times two on v2/v3."""
        return sum(CORES_PER_CHIP.get(g, 1) for g in self.generations)

    def describe(self) -> str:
        if self.generations:
            kinds = sorted(set(self.generations))
            return f"{self.count} TPU chip(s) ({', '.join(kinds)}) on the PCI bus"
        return f"TPU device files ({', '.join(self.device_files[:3])})"


def scan(root: str | os.PathLike = "/") -> TpuChips:
    """Google TPU functions on the PCI bus and TPU device files under ``root``."""
    root = Path(root)
    generations = []
    for vendor in sorted((root / "sys/bus/pci/devices").glob("*/vendor")):
        if _read(vendor) != GOOGLE_PCI_VENDOR:
            continue
        generation = TPU_PCI_DEVICES.get(_read(vendor.parent / "device"))
        if generation is not None:
            generations.append(generation)
    files = sorted(str(p) for p in (root / "dev").glob("accel*"))
    files += sorted(str(p) for p in (root / "dev/vfio").glob("[0-9]*"))
    return TpuChips(tuple(generations), tuple(files))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def installed(package: str) -> bool:
    """The package can be imported (found by its spec: nothing is imported)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def libtpu_found() -> bool:
    """libtpu is installed (the ``libtpu`` wheel, or bundled in torch_xla/lib) or named by
    TPU_LIBRARY_PATH: where torch_xla and torch_tpu look for it."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if installed("libtpu") or (path and Path(path).is_file()):
        return True
    spec = importlib.util.find_spec("torch_xla") if installed("torch_xla") else None
    folders = (spec.submodule_search_locations or []) if spec else []
    return any(Path(f, "lib", "libtpu.so").is_file() for f in folders)


def metadata_reachable(url: str = METADATA_URL, timeout: float = METADATA_TIMEOUT_S) -> bool:
    """The GCE metadata server answers within ``timeout`` seconds (any HTTP answer counts)."""
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def tpu_runtimes() -> list[str]:
    """The TPU backends installed here, preferred first: torchtpu (the successor), then xla."""
    found = []
    if installed("torch_tpu"):
        found.append("torchtpu")
    if installed("torch_xla"):
        found.append("xla")
    return found


def tpu_runtime_problem(chips: TpuChips, runtime: str | None,
                        metadata_url: str = METADATA_URL, timeout: float = METADATA_TIMEOUT_S) -> str | None:
    """Why ``runtime`` (torchtpu, xla, or None: none installed) cannot start on these visible
    chips, as one line with what to do; None when nothing stops it that can be seen from here."""
    where = chips.describe()
    if runtime is None:
        return (f"{where} but no TPU runtime is installed: pip install 'moco_xla[xla]' (PyTorch/XLA) "
                f"or 'moco_xla[torchtpu]' (TorchTPU), or pass --backend cpu to train on the CPU")
    if not libtpu_found():
        extra = "torchtpu" if runtime == "torchtpu" else "xla"
        return (f"{where} but libtpu is not installed, so the {runtime} runtime cannot start: "
                f"pip install 'moco_xla[{extra}]' (it brings libtpu) or set TPU_LIBRARY_PATH to libtpu.so")
    if not os.environ.get(SKIP_METADATA_ENV) and not metadata_reachable(metadata_url, timeout):
        return (f"{where} but the GCE metadata server did not answer within {timeout:g} s, and the TPU "
                f"runtime waits for it forever to learn the topology: run the container with "
                f"--net host (docker run --net host --privileged), or set {SKIP_METADATA_ENV}=1 with "
                f"TPU_ACCELERATOR_TYPE (e.g. v5litepod-8) and the other TPU_* topology variables")
    return None
