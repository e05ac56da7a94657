"""Every bad input gets one line ``error: ...`` naming what is wrong, exit code 2, no traceback.

One table drives both ways in: the real CLI in a subprocess for a representative subset
(``cli`` rows), the in-process ``launch.main(argv)`` for the rest (no interpreter start-up).
Placeholders in argv: {tmp} a fresh directory, {ckpt} a real checkpoint of the tiny config,
{run} a run directory holding checkpoints, {file} a plain file, {junk} a file of random bytes,
{notckpt} a torch file that is not a checkpoint, {yaml_*} config files, {gs} the GCS emulator.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from reliability_fns import TINY, cli, reference_run, run_inprocess

from moco_xla.data.emulator import gcs_emulator

# (id, argv, text the one error line must contain, how: "cli" | "main", extra environment)
CASES = [
    ("unknown-key", ["--set", "train.lrr=0.1"], "unknown config key 'train.lrr'; did you mean 'train.lr'", "cli", {}),
    ("k-not-divisible", ["--set", "moco.K=100"], "moco.K=100 must be divisible by 2 x global batch", "cli", {}),
    ("resume-missing", ["--resume", "{tmp}/nope/ckpt-000000003.pt"], "does not exist", "cli", {}),
    ("resume-other-arch", ["--resume", "{ckpt}", "--set", "model.arch=resnet18", "--set", "model.in_channels=1"],
     "was written with model.arch='small_resnet' but this run has model.arch='resnet18'", "cli", {}),
    ("unknown-flag", ["--resme", "auto"], "did you mean --resume?", "cli", {}),
    ("unknown-section", ["--set", "trian.lr=1"], "unknown config key 'trian.lr'; did you mean 'train'", "main", {}),
    ("int-type", ["--set", "train.epochs=abc"], "'train.epochs' must be int, got 'abc'", "main", {}),
    ("bool-type", ["--set", "moco.symmetric=maybe"], "'moco.symmetric' must be bool", "main", {}),
    ("float-type", ["--set", "train.lr=[1]"], "'train.lr' must be float", "main", {}),
    ("negative-lr", ["--set", "train.lr=-0.1"], "'train.lr' must be > 0, got -0.1", "main", {}),
    ("momentum-1", ["--set", "moco.m=1.0"], "'moco.m' must be in [0, 1), got 1.0", "main", {}),
    ("momentum-negative", ["--set", "moco.m=-0.5"], "'moco.m' must be in [0, 1)", "main", {}),
    ("temperature-0", ["--set", "moco.T=0"], "'moco.T' must be > 0, got 0.0", "main", {}),
    ("temperature-negative", ["--set", "moco.T=-1"], "'moco.T' must be > 0", "main", {}),
    ("debias-1", ["--set", "moco.debias=1"], "'moco.debias' must be in [0, 1) (0: plain InfoNCE), got 1.0", "main", {}),
    ("debias-v3", ["--set", "moco.version=3", "--set", "moco.debias=0.1"],
     "'moco.debias' is for the queue's negatives (moco.version 1 or 2)", "main", {}),
    ("nn-weight-2", ["--set", "moco.nn_weight=2"], "'moco.nn_weight' must be in [0, 1]", "main", {}),
    ("nn-weight-v3", ["--set", "moco.version=3", "--set", "moco.nn_weight=1"],
     "'moco.nn_weight' draws the positive from the queue (moco.version 1 or 2)", "main", {}),
    ("nn-weight-debias", ["--set", "moco.nn_weight=0.5", "--set", "moco.debias=0.1"],
     "'moco.nn_weight' and moco.debias are exclusive", "main", {}),
    ("nn-warmup-without-weight", ["--set", "moco.nn_warmup_epochs=2"],
     "'moco.nn_warmup_epochs' is 2, but warms up moco.nn_weight, which is 0", "main", {}),
    ("epochs-0", ["--set", "train.epochs=0"], "'train.epochs' must be >= 1", "main", {}),
    ("bad-choice", ["--set", "train.schedule=linear"], "valid: cosine, step, constant", "main", {}),
    ("crop-scale-0", ["--set", "data.crop_min_scale=0"], "'data.crop_min_scale' must be in (0, 1] or null", "main", {}),
    ("crop-scale-no-crop", ["--set", "data.augment=handwriting", "--set", "data.crop_min_scale=0.5"],
     "data.augment=handwriting makes no random resized crop; valid with: moco_v1", "main", {}),
    ("set-no-equals", ["--set", "train.lr"], "must look like section.key=value", "main", {}),
    ("keep-0", ["--set", "checkpoint.keep=0"], "'checkpoint.keep' must be >= 1", "main", {}),
    ("cores-0", ["--cores", "0"], "--cores must be >= 1, got 0", "main", {}),
    ("no-gpu", ["--backend", "cuda"], "--backend cuda found no CUDA GPU", "main", {}),
    ("xla-cores", ["--backend", "xla", "--cores", "4"], "--cores 4 is not available on XLA: CPU_NUM_DEVICES "
     "exposes 2 device(s)", "main", {"CPU_NUM_DEVICES": "2"}),
    ("batch-vs-cores", ["--backend", "cpu", "--cores", "3"], "must be divisible by the 3 replicas", "main", {}),
    ("bn-splits", ["--set", "model.bn_splits=3"], "divisible by model.bn_splits=3", "main", {}),
    ("fp16-on-cpu", ["--backend", "cpu", "--set", "train.precision=fp16"], "needs --backend cuda", "main", {}),
    ("torchrun-cores", ["--backend", "cpu", "--cores", "3"], "disagrees with torchrun's WORLD_SIZE=2", "main",
     {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}),
    ("config-unknown", ["--config", "nope"], "unknown config 'nope'; valid:", "main", {}),
    ("config-missing", ["--config", "{tmp}/missing.yaml"], "missing.yaml does not exist", "main", {}),
    ("config-bad-yaml", ["--config", "{yaml_broken}"], "is not valid YAML", "main", {}),
    ("config-not-mapping", ["--config", "{yaml_list}"], "must be a mapping of sections", "main", {}),
    ("config-file-typo", ["--config", "{yaml_typo}"], "unknown config key 'train.lrr'; did you mean 'train.lr'", "main", {}),
    ("data-root-missing", ["--set", "data.dataset=mnist", "--set", "data.root={tmp}/no-mnist"], "no-mnist", "main", {}),
    ("dataset-unknown", ["--set", "data.dataset=imagenet22k"], "unknown dataset 'imagenet22k'", "main", {}),
    ("resume-empty", ["--resume", ""], "--resume needs a value", "main", {}),
    ("resume-auto-no-out", ["--resume", "auto", "--out", None], "--resume auto needs --out", "main", {}),
    ("resume-dir-empty", ["--resume", "{tmp}"], "holds no committed checkpoint", "main", {}),
    ("resume-junk", ["--resume", "{junk}"], "is unreadable", "main", {}),
    ("resume-not-checkpoint", ["--resume", "{notckpt}"], "is not a moco_xla checkpoint", "main", {}),
    ("resume-other-K", ["--resume", "{ckpt}", "--set", "moco.K=512"],
     "was written with moco.K=256 but this run has moco.K=512", "main", {}),
    ("resume-other-batch", ["--resume", "{ckpt}", "--set", "train.batch_size=64", "--set", "moco.K=256"],
     "train.batch_size=32 but this run has train.batch_size=64", "main", {}),
    ("out-has-checkpoints", ["--out", "{run}"], "already holds checkpoints", "main", {}),
    ("out-is-file", ["--out", "{file}"], "is a file", "main", {}),
    ("checkpoint-dir-under-file", ["--set", "checkpoint.dir={file}/ckpts"], "is a file, not a directory", "main", {}),
    ("bucket-missing", ["--set", "checkpoint.dir={gs}no-such-bucket/run"],
     "bucket gs://no-such-bucket does not exist", "main", {}),
    ("bucket-no-name", ["--set", "checkpoint.dir=gs:///run"], "names no bucket", "main", {}),
    ("endpoint-unreachable", ["--set", "checkpoint.dir=gs://ckpt/run"], "is unreachable", "main",
     {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:{closed_port}"}),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Files the table refers to: a real checkpoint, a run holding it, broken configs and checkpoints."""
    d = tmp_path_factory.mktemp("bad_input")
    run = reference_run(tuple(TINY + ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1",
                                      "--set", "eval.max_bank=64"]), subprocess_run=False)
    (d / "file").write_text("not a directory\n")
    (d / "junk.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3)}, d / "notckpt.pt")
    (d / "broken.yaml").write_text("train: {lr: [1, 2\n")
    (d / "list.yaml").write_text("- train\n- model\n")
    (d / "typo.yaml").write_text("train:\n  lrr: 0.1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket closes
    with gcs_emulator(buckets=["ckpt"]):
        yield {"ckpt": str(run / "checkpoints" / "ckpt-000000001.pt"), "run": str(run), "file": str(d / "file"),
               "junk": str(d / "junk.pt"), "notckpt": str(d / "notckpt.pt"), "yaml_broken": str(d / "broken.yaml"),
               "yaml_list": str(d / "list.yaml"), "yaml_typo": str(d / "typo.yaml"), "gs": "gs://",
               "closed_port": str(closed_port)}


def _fill(text: str, places: dict, tmp: Path) -> str:
    return text.format(tmp=tmp, **places)


def _argv(argv: list, places: dict, tmp: Path) -> list[str]:
    """Fill placeholders; add the tiny config and an --out in ``tmp`` unless given (None: no --out)."""
    full = [_fill(a, places, tmp) for a in argv if a is not None]
    if "--config" not in full:
        full = TINY + full
    if "--out" not in argv:
        full += ["--out", str(tmp / "out")]
    elif None in argv:
        full.remove("--out")
    return full


def _check_one_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert expected in errors[0], errors[0]


def test_table_has_enough_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    assert sum(c[3] == "cli" for c in CASES) >= 5


NEEDS_XLA = {"xla-cores"}  # cases that run torch_xla (skipped where it is not installed)


@pytest.mark.parametrize("name,argv,expected,how,extra_env",
                         [pytest.param(*c, marks=pytest.mark.needs_xla) if c[0] in NEEDS_XLA else c for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input(name, argv, expected, how, extra_env, places, tmp_path, capsys, monkeypatch):
    argv = _argv(argv, places, tmp_path)
    for key, value in extra_env.items():
        monkeypatch.setenv(key, _fill(value, places, tmp_path))
    if how == "cli":
        p = cli(argv, timeout=120)
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        _check_one_line(p.stderr, expected)
    else:
        assert run_inprocess(argv) == 2
        _check_one_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing started


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert run_inprocess(TINY + ["--set", "moco.T=0", "--out", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err and err.strip().endswith("must be > 0, got 0.0")
