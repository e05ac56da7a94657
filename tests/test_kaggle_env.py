"""Kaggle's TPU image sets TPU_PROCESS_ADDRESSES=local, which stops every replica process of
xmp.spawn ("Expected N worker addresses, got 1"): the launcher removes it and says so once."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_xla  # the fix lives in the torch_xla backend's spawn path


@pytest.fixture
def xla():
    from moco_xla.runtime import xla
    return xla


ROOT = Path(__file__).resolve().parent.parent

MESSAGE = "removed TPU_PROCESS_ADDRESSES=local"


def test_local_addresses_removed_and_user_told_once(xla, monkeypatch, capsys):
    monkeypatch.setattr(xla, "_told_kaggle", [])
    env = {"TPU_PROCESS_ADDRESSES": "local", "PJRT_DEVICE": "TPU"}
    assert xla.correct_spawn_environment(env) is True
    assert env == {"PJRT_DEVICE": "TPU"}
    again = {"TPU_PROCESS_ADDRESSES": "LOCAL "}
    assert xla.correct_spawn_environment(again) is True and again == {}
    assert xla.correct_spawn_environment(again) is False  # nothing left to correct
    assert capsys.readouterr().err.count(MESSAGE) == 1


def test_real_address_lists_are_left_alone(xla, monkeypatch, capsys):
    monkeypatch.setattr(xla, "_told_kaggle", [])
    env = {"TPU_PROCESS_ADDRESSES": "localhost:8476,localhost:8477"}
    assert xla.correct_spawn_environment(env) is False
    assert env == {"TPU_PROCESS_ADDRESSES": "localhost:8476,localhost:8477"}
    assert xla.correct_spawn_environment({}) is False
    assert MESSAGE not in capsys.readouterr().err


SCRIPT = textwrap.dedent("""
    import os, sys
    from moco_xla.runtime import replicas

    def body(backend, rank, world, local_rank, out):
        with open(out, "a") as f:
            f.write(repr(os.environ.get("TPU_PROCESS_ADDRESSES")) + "\\n")

    for _ in range(2):  # two launches in one process (a notebook kernel): told once
        os.environ["TPU_PROCESS_ADDRESSES"] = "local"
        replicas.start("xla", 1, body, (sys.argv[1],))
""")


def test_xla_launch_path_corrects_the_spawn_environment(tmp_path):
    """replicas.start -> xmp.spawn on one XLA:CPU replica: the replica never sees the variable."""
    out = tmp_path / "seen.txt"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "TPU_PROCESS_ADDRESSES": "local",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.read_text().split() == ["None", "None"]
    assert p.stderr.count(MESSAGE) == 1, p.stderr[-3000:]
