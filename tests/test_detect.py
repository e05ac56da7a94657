"""TPU detection (runtime/detect.py, resolve_backend) against a fake /sys and /dev tree and real
loopback sockets standing in for the GCE metadata server: bounded in seconds, never a silent CPU
run when chips are visible, never an import of torch_tpu. No TPU is touched."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from moco_xla.errors import UserError
from moco_xla.runtime import detect, resolve_backend

ROOT = Path(__file__).resolve().parent.parent


def fake_host(tmp_path: Path, chips: dict[str, int], vfio: int = 0, accel: int = 0) -> Path:
    """A /sys/bus/pci/devices tree with ``chips`` {PCI device id: count} of Google's vendor id, a
    gVNIC (Google's vendor, not a TPU) and an Intel bridge; optional /dev/vfio/N and /dev/accelN."""
    root = tmp_path / "host"
    devices = root / "sys/bus/pci/devices"
    functions = [(detect.GOOGLE_PCI_VENDOR, "0x0042"), ("0x8086", "0x1237")]  # gVNIC, host bridge
    functions += [(detect.GOOGLE_PCI_VENDOR, dev) for dev, n in chips.items() for _ in range(n)]
    for i, (vendor, device) in enumerate(functions):
        slot = devices / f"0000:00:{i + 4:02x}.0"
        slot.mkdir(parents=True)
        (slot / "vendor").write_text(vendor + "\n")
        (slot / "device").write_text(device + "\n")
    (root / "dev/vfio").mkdir(parents=True)
    (root / "dev/vfio/vfio").write_text("")  # the container node exists on every VFIO host
    for n in range(vfio):
        (root / f"dev/vfio/{n}").write_text("")
    for n in range(accel):
        (root / f"dev/accel{n}").write_text("")
    return root


@pytest.mark.parametrize("device_id, n, generation, devices", [
    ("0x0063", 8, "v5e", 8), ("0x006f", 4, "v6e", 4), ("0x005e", 4, "v4", 4), ("0x0062", 4, "v5p", 4),
    ("0x0027", 4, "v2/v3", 8),  # two cores per chip
])
def test_scan_counts_tpu_chips_on_the_pci_bus(tmp_path, device_id, n, generation, devices):
    chips = detect.scan(fake_host(tmp_path, {device_id: n}))
    assert chips.visible and chips.count == n and chips.devices == devices
    assert set(chips.generations) == {generation}
    assert f"{n} TPU chip(s) ({generation})" in chips.describe()


def test_scan_sees_no_tpu_on_a_host_with_only_other_google_devices(tmp_path):
    chips = detect.scan(fake_host(tmp_path, {}))
    assert not chips.visible and chips.count == 0  # the gVNIC (0x1ae0:0x0042) is not a TPU


def test_scan_sees_tpu_device_files_without_pci(tmp_path):
    """A container that mounts the chips but not /sys: the device files alone make them visible."""
    root = fake_host(tmp_path, {}, vfio=2)
    (root / "sys").rename(tmp_path / "elsewhere")
    chips = detect.scan(root)
    assert chips.visible and chips.count == 0 and len(chips.device_files) == 2
    assert detect.scan(fake_host(tmp_path / "b", {}, accel=4)).device_files[0].endswith("dev/accel0")


def test_auto_without_chips_is_cpu_here(tmp_path, monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert resolve_backend("auto", root=str(fake_host(tmp_path, {}))) == "cpu"


def test_auto_with_chips_but_no_usable_runtime_stops_with_one_line(tmp_path, monkeypatch):
    """Here torch_tpu is never installed, and torch_xla (where installed) has no libtpu: visible
    chips are a UserError naming the chips and the install line, not a CPU run."""
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    root = fake_host(tmp_path, {"0x0063": 4})
    with pytest.raises(UserError) as e:
        resolve_backend("auto", root=str(root))
    msg = str(e.value)
    assert "\n" not in msg and "4 TPU chip(s) (v5e)" in msg and "moco_xla[xla]" in msg
    want = "libtpu is not installed" if detect.installed("torch_xla") else "no TPU runtime is installed"
    assert want in msg
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # an explicit XLA:CPU / CPU choice is respected
    assert resolve_backend("auto", root=str(root)) == "cpu"


def test_runtime_problem_names_each_cause(tmp_path, monkeypatch):
    chips = detect.scan(fake_host(tmp_path, {"0x006f": 8}))
    assert "no TPU runtime is installed" in detect.tpu_runtime_problem(chips, None)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    if not detect.libtpu_found():
        assert "libtpu is not installed" in detect.tpu_runtime_problem(chips, "torchtpu")
    libtpu = tmp_path / "libtpu.so"
    libtpu.write_bytes(b"")
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(libtpu))
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # topology from the environment: nothing to wait for
    assert detect.tpu_runtime_problem(chips, "xla", metadata_url=f"http://127.0.0.1:{_closed_port()}/") is None
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    problem = detect.tpu_runtime_problem(chips, "xla", metadata_url=f"http://127.0.0.1:{_closed_port()}/",
                                         timeout=1.0)
    assert "metadata server did not answer within 1 s" in problem and "--net host" in problem


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once returned: connections are refused


def test_metadata_probe_is_bounded_when_the_server_never_answers():
    """A server that accepts the connection and then says nothing (the hang torch_xla's and
    libtpu's unbounded requests meet): the probe gives up after its timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/computeMetadata/v1/instance/attributes/x"
        t0 = time.monotonic()
        assert not detect.metadata_reachable(url, timeout=1.0)
        assert time.monotonic() - t0 < 3.0


class _Metadata(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.headers.get("Metadata-Flavor") == "Google"
        self.send_response(200 if ok else 403)
        self.end_headers()
        self.wfile.write(b"v5litepod-8")

    def log_message(self, *args) -> None:
        pass


def test_metadata_probe_sees_a_server_that_answers(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/attributes/accelerator-type"
        assert detect.metadata_reachable(url, timeout=2.0)
        chips = detect.scan(fake_host(tmp_path, {"0x0063": 8}))
        libtpu = tmp_path / "libtpu.so"
        libtpu.write_bytes(b"")
        monkeypatch.setenv("TPU_LIBRARY_PATH", str(libtpu))
        monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
        assert detect.tpu_runtime_problem(chips, "torchtpu", metadata_url=url) is None
    finally:
        server.shutdown()
        server.server_close()


def test_torchtpu_without_torch_tpu_or_chips_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"--backend torchtpu needs torch_tpu .*moco_xla\[torchtpu\].*no TPU chips"):
        resolve_backend("torchtpu", root=str(fake_host(tmp_path, {})))


def test_cli_backend_torchtpu_here_exits_2_with_one_line(tmp_path):
    """The real launcher: no torch_tpu and no TPU on this machine -> exit 2, one line, nothing trained."""
    res = subprocess.run([sys.executable, "-m", "moco_xla.launch", "--backend", "torchtpu", "--config", "tiny",
                          "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "--backend torchtpu needs torch_tpu" in lines[0], res.stderr
    assert "pip install 'moco_xla[torchtpu]'" in lines[0] and "valid here:" in lines[0]
    assert not (tmp_path / "run").exists()
