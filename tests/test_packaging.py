"""moco_xla as a package: pyproject.toml and requirements*.txt declare the same dependencies, and
a wheel built from the tree, installed into a fresh virtual environment, runs the tiny config by
name from another directory (the configs ship inside the package) through its console script."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (no comments, no -r includes)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def _by_name(requirements: list[str]) -> dict[str, str]:
    return {_name(r): re.sub(r"\[[^\]]*\]", "", r).replace(" ", "") for r in requirements}


def test_every_console_script_names_a_callable_main():
    """Each `moco-xla*` script points at an importable function (a wheel's launcher would fail late)."""
    import importlib
    assert PYPROJECT["scripts"], "pyproject.toml declares no console scripts"
    for script, target in PYPROJECT["scripts"].items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{script} -> {target}"


def test_requirements_files_match_pyproject():
    """requirements.txt = the [xla] pins + the base dependencies but torch's range;
    requirements-dev.txt = it + the [dev] extra. The base torch range admits the [xla] pins."""
    extras = PYPROJECT["optional-dependencies"]
    base = _by_name(PYPROJECT["dependencies"])
    xla = _by_name(extras["xla"])
    want = {**{k: v for k, v in base.items() if k not in xla}, **xla}
    assert _by_name(_requirements(ROOT / "requirements.txt")) == want
    assert _by_name(_requirements(ROOT / "requirements-dev.txt")) == _by_name(extras["dev"])
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    from packaging.requirements import Requirement
    for name in ("torch", "torchvision"):
        pinned = Requirement(xla[name]).specifier
        assert Requirement(base[name]).specifier.contains(next(iter(pinned)).version), name
    assert "torch-tpu" in _by_name(extras["torchtpu"])


def test_configs_found_by_name_from_any_directory(tmp_path):
    """Names find the packaged configs; a user's file by path works; configs/NAME.yaml (how the
    source tree used to name them) still finds the packaged one; an unknown name lists the valid."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 1\n")
    code = ("import sys; from moco_xla.config import load_config, config_path, CONFIG_DIR; "
            "print(CONFIG_DIR.parent.name, load_config('tiny').name, load_config('mine.yaml').train.epochs, "
            "config_path('configs/tiny.yaml') == config_path('tiny'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.split() == ["moco_xla", "tiny", "1", "True"], res.stderr
    res = subprocess.run([sys.executable, "-m", "moco_xla.launch", "--config", "tinny"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown config 'tinny'; valid: " in res.stderr and "tiny" in res.stderr


def _fresh_venv(where: Path) -> Path:
    """A virtual environment that sees this one's installed packages (a .pth line: no download of
    torch again) but not its moco_xla: lines of a .pth are plain paths, their own .pth files and
    the editable install's finder stay unread."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "outer_env.pth").write_text("\n".join(paths) + "\n")
    return python


def test_wheel_installs_into_a_fresh_venv_and_runs_tiny_by_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for part in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / part, src / part)
    shutil.copytree(ROOT / "moco_xla", src / "moco_xla", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(dist), str(src)], check=True, cwd=tmp_path, timeout=300)
    [wheel] = dist.glob("moco_xla-*.whl")
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --no-index: every dependency must already be satisfied by the outer environment's torch
    # (2.9 in the torch_xla CI, the newest in the other): the declared ranges admit both.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
                    str(wheel)], check=True, env=env, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import moco_xla; print(moco_xla.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where
    region = subprocess.run([str(python), "-c", "import moco_xla.data._jpeg_region as m; print(m.__file__)"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert region.returncode == 0 and region.stdout.startswith(str(tmp_path / "venv")), region.stderr[-2000:]
    out = elsewhere / "run"
    res = subprocess.run([str(tmp_path / "venv" / "bin" / "moco-xla"), "--config", "tiny", "--backend", "cpu",
                          "--out", str(out), "--set", "train.epochs=1"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "cpu" and summary["config"] == "tiny", summary
