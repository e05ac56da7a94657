"""eval.knn_layer: the kNN reads the backbone or the projection MLP's hidden layer. The readout is the
encoder's own layers (sharing their weights during pre-training), configs without an MLP head are refused
in one line, and the eval command on a run's checkpoint reproduces the monitor's kNN for either layer."""
from __future__ import annotations

import pytest
import torch

from eval_fns import run_eval
from moco_xla.config import load_config, validate
from moco_xla.errors import UserError
from moco_xla.eval.readout import knn_readout
from moco_xla.models import Encoder, SmallResNet
from moco_xla.report import read_summary
from moco_xla.runtime import make_runtime
from moco_xla.train import train


def test_mlp_hidden_is_the_heads_first_layer_and_shares_its_weights():
    torch.manual_seed(0)
    backbone = SmallResNet(1, 8)
    encoder = Encoder(backbone, backbone.out_dim, dim=16, mlp=True).eval()
    x = torch.randn(4, 1, 16, 16)
    hidden = knn_readout(encoder, "mlp_hidden")
    assert not hidden.training  # follows the encoder's mode
    expected = torch.relu(encoder.head[0](backbone(x)))
    assert torch.equal(hidden(x), expected) and hidden(x).shape == (4, backbone.out_dim)
    with torch.no_grad():
        encoder.head[0].bias += 1.0  # the readout is the encoder's own layer, not a copy
    assert torch.equal(hidden(x), torch.relu(encoder.head[0](backbone(x))))
    assert knn_readout(encoder, "backbone") is backbone


@pytest.mark.parametrize("overrides", [["model.mlp=false"], ["moco.version=3", "model.bn_splits=1"]])
def test_mlp_hidden_without_a_v2_mlp_head_is_refused(overrides):
    validate(load_config("tiny", overrides))  # valid with the backbone readout
    with pytest.raises(UserError, match=r"eval.knn_layer.*valid: backbone"):
        load_config("tiny", [*overrides, "eval.knn_layer=mlp_hidden"])
    with pytest.raises(UserError, match=r"eval.knn_layer.*valid: backbone, mlp_hidden"):
        load_config("tiny", ["eval.knn_layer=head"])


def test_eval_command_reproduces_the_monitor_for_either_layer(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("tiny", ["train.epochs=2", "train.max_steps_per_epoch=3", "eval.knn_layer=mlp_hidden",
                               "eval.knn_bn=recompute"])
    monitored = train(cfg, make_runtime("local"), run)["knn_top1"]
    scores = {}
    for layer in ("mlp_hidden", "backbone"):
        p = run_eval(["knn", "--ckpt", str(run), "--out", str(tmp_path / layer), "--set", f"eval.knn_layer={layer}"])
        assert p.returncode == 0, p.stderr[-3000:]
        summary = read_summary(tmp_path / layer)
        assert summary["knn"]["layer"] == layer
        scores[layer] = summary["knn_top1"]
    assert scores["mlp_hidden"] == monitored  # the same features, bank and BN statistics as the monitor's
    assert scores["backbone"] != monitored  # another layer: other features
