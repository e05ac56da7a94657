"""The TPU VM Dockerfile: hadolint clean, framework pins equal to requirements.txt, a build context
that holds what the image copies. No container daemon runs here, so these are the checks that can."""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PINNED = ("torch", "torchvision", "torch_xla")


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not installed: pip install -r requirements-dev.txt")
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def _dockerfile_pins() -> dict[str, str]:
    pins = {}
    for word, args in _instructions():
        if word == "RUN" and "pip install" in args:
            for token in shlex.split(args):
                m = re.match(r"^([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==(.+)$", token)
                if m:
                    pins[m.group(1)] = m.group(3)
    return pins


def test_hadolint_clean():
    res = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_framework_pins_match_requirements():
    req, docker = _requirement_pins(), _dockerfile_pins()
    for name in PINNED:
        assert name in req, f"requirements.txt lost its {name}== pin"
        assert docker.get(name) == req[name], f"Dockerfile pins {name}=={docker.get(name)}, requirements.txt {req[name]}"


def test_installs_tpu_extra_on_python_311_and_enters_launcher():
    ins = _instructions()
    assert ins[0][0] == "FROM" and re.match(r"python:3\.11-slim", ins[0][1]), ins[0]
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "torch_xla[tpu]==" in runs, "libtpu comes with the [tpu] extra"
    assert "--requirement requirements.txt" in runs or "-r requirements.txt" in runs
    assert '".[xla]"' in runs, "the package installs through its [xla] extra"
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    assert entry and shlex.split(entry[-1].strip("[]").replace(",", " ")) == ["python", "-m", "moco_xla.launch"]


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_build_context_has_what_the_image_copies():
    """Every COPY source exists and is not excluded by .dockerignore; the big local dirs are."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [shlex.split(a)[:-1] for w, a in _instructions() if w == "COPY"]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    for needed in ("pyproject.toml", "setup.py", "README.md", "requirements.txt", "moco_xla"):
        assert needed in sources, f"the image does not COPY {needed}"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for heavy in (".venv", ".git", "runs"):
        assert _ignored(heavy, patterns), f".dockerignore must exclude {heavy}"


def test_image_layout_finds_configs(tmp_path):
    """The image's /app layout (only the copied paths) resolves configs by name and loads them."""
    app = tmp_path / "app"
    app.mkdir()
    for src in ("pyproject.toml", "README.md", "requirements.txt", "moco_xla"):
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, app / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, app / src)
    code = "from moco_xla.config import load_config; c = load_config('tiny'); print(c.name)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(app), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == "tiny", res.stderr
