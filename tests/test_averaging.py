"""train.average_from and eval.knn_encoder=averaged: the query encoder's weights averaged uniformly over
the last epochs (SWA), kept beside the encoders, checkpointed, read by the kNN monitor and by the eval
command; bad settings refused in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moco_xla.averaging import WeightAverage
from moco_xla.checkpoint import load_checkpoint
from moco_xla.config import load_config
from moco_xla.errors import UserError
from moco_xla.eval import command as moco_eval
from moco_xla.report import read_summary
from moco_xla.runtime import make_runtime
from moco_xla.train import train


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    nn.init.normal_(net[1].weight), nn.init.normal_(net[1].bias)
    net.train()(torch.randn(8, 1, 6, 6) * (seed + 1))  # running statistics of its own
    return net


def test_the_average_is_the_uniform_mean_of_every_weight_and_bn_statistic():
    nets = [_net(s) for s in range(3)]
    avg = WeightAverage(nets[0])
    assert int(avg.n_averaged) == 0 and not any(p.requires_grad for p in avg.encoder.parameters())
    for net in nets:
        avg.update(net)
    assert int(avg.n_averaged) == 3
    for name, value in avg.encoder.state_dict().items():
        values = [net.state_dict()[name] for net in nets]
        if value.is_floating_point():
            mean = torch.stack(values).mean(0)
            assert torch.allclose(value, mean, atol=1e-6), name
            assert not torch.allclose(value, values[-1], atol=1e-3), name  # not just the last one
        else:  # BN's batch counter: copied
            assert torch.equal(value, values[-1])
    nets[0][0].weight.data.add_(1.0)
    assert not torch.allclose(avg.encoder[0].weight, nets[0][0].weight)  # a copy, not the module itself


def test_a_run_averages_the_query_encoder_from_average_from_on_and_the_knn_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config("tiny", ["train.epochs=3", "train.average_from=2", "eval.knn_encoder=averaged",
                               "eval.knn_every=1", "checkpoint.keep=10"])
    monitored = train(cfg, make_runtime("local"), run)["knn_top1"]
    checkpoints = sorted((run / "checkpoints").glob("ckpt-*.pt"))
    states = [load_checkpoint(str(p))["model"] for p in checkpoints]
    assert [int(s["encoder_avg.n_averaged"]) for s in states] == [0, 1, 2]
    for name in states[-1]:
        if name.startswith("encoder_q.") and states[-1][name].is_floating_point():
            averaged = states[-1]["encoder_avg.encoder." + name[len("encoder_q."):]]
            mean = (states[1][name] + states[2][name]) / 2  # the query encoder at the ends of epochs 2 and 3
            assert torch.allclose(averaged, mean, atol=1e-6), name
    scores = {}
    for encoder in ("averaged", "query"):
        out = tmp_path / encoder
        assert moco_eval.main(["knn", "--ckpt", str(run), "--out", str(out),
                               "--set", f"eval.knn_encoder={encoder}"]) == 0
        scores[encoder] = read_summary(out)["knn_top1"]
    assert scores["averaged"] == monitored != scores["query"]  # the monitor read the average
    assert moco_eval.main(["knn", "--ckpt", str(checkpoints[0]), "--out", str(tmp_path / "early")]) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "before epoch train.average_from=2: no weights averaged yet; valid: eval.knn_encoder=query" in error


def test_bad_averaging_settings_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"train.average_from.*must be in \[0, train.epochs=2\].*got 3"):
        load_config("tiny", ["train.average_from=3"])
    with pytest.raises(UserError, match=r"eval.knn_encoder.*averaged, but train.average_from is 0.*valid: query, key"):
        load_config("tiny", ["eval.knn_encoder=averaged"])
    with pytest.raises(UserError, match=r"eval.knn_encoder.*valid: query, key, averaged"):
        load_config("tiny", ["eval.knn_encoder=mean"])
