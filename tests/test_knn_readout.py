"""eval.knn_layer and eval.knn_encoder: the kNN reads the backbone, the projection MLP's hidden layer or
the head's output, of the query or the key encoder, centred on the bank's mean feature or not
(eval.knn_centre). The readout is the encoder's own layers (sharing their weights during pre-training),
configs without such a head are refused in one line, and the eval command on a run's checkpoint
reproduces the monitor's kNN for the readout the run monitored."""
from __future__ import annotations

import pytest
import torch

from eval_fns import run_eval
from moco_xla.config import load_config, validate
from moco_xla.errors import UserError
from moco_xla.eval import command as moco_eval
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
    assert knn_readout(encoder, "projection") is encoder  # the head's output: what the loss compares


@pytest.mark.parametrize("overrides", [["model.mlp=false"], ["moco.version=3", "model.bn_splits=1"]])
def test_mlp_hidden_without_a_v2_mlp_head_is_refused(overrides):
    validate(load_config("tiny", overrides))  # valid with the backbone readout
    with pytest.raises(UserError, match=r"eval.knn_layer.*valid: backbone"):
        load_config("tiny", [*overrides, "eval.knn_layer=mlp_hidden"])
    with pytest.raises(UserError, match=r"eval.knn_layer.*valid: backbone, mlp_hidden, projection"):
        load_config("tiny", ["eval.knn_layer=head"])
    with pytest.raises(UserError, match=r"eval.knn_encoder.*valid: query, key"):
        load_config("tiny", ["eval.knn_encoder=momentum"])


def test_projection_needs_a_v1_or_v2_head():
    validate(load_config("tiny", ["model.mlp=false", "eval.knn_layer=projection"]))  # v1's linear head
    with pytest.raises(UserError, match=r"eval.knn_layer.*projection.*moco.version=3; valid: backbone"):
        load_config("tiny", ["moco.version=3", "model.bn_splits=1", "eval.knn_layer=projection"])


@pytest.mark.parametrize("encoder,layer,centre", [("query", "mlp_hidden", True), ("key", "projection", False)])
def test_eval_command_reproduces_the_monitor(tmp_path, encoder, layer, centre):
    run = tmp_path / "run"
    cfg = load_config("tiny", ["train.epochs=2", "train.max_steps_per_epoch=3", f"eval.knn_layer={layer}",
                               f"eval.knn_encoder={encoder}", "eval.knn_bn=recompute", f"eval.knn_centre={centre}"])
    monitored = train(cfg, make_runtime("local"), run)["knn_top1"]
    other = "query" if encoder == "key" else "key"
    scores = {}
    for name, setting in {"monitored": (encoder, layer, centre), "other layer": (encoder, "backbone", centre),
                          "other encoder": (other, layer, centre), "other centring": (encoder, layer, not centre)}.items():
        argv = ["knn", "--ckpt", str(run), "--out", str(tmp_path / name.replace(" ", "_")),
                "--set", f"eval.knn_encoder={setting[0]}", "--set", f"eval.knn_layer={setting[1]}",
                "--set", f"eval.knn_centre={setting[2]}"]
        if name == "monitored":  # the command as a user runs it; the other readouts in this process (same main)
            p = run_eval(argv)
            assert p.returncode == 0, p.stderr[-3000:]
        else:
            assert moco_eval.main(argv) == 0
        summary = read_summary(tmp_path / name.replace(" ", "_"))
        assert (summary["knn"]["encoder"], summary["knn"]["layer"], summary["knn"]["centre"]) == setting
        scores[name] = summary["knn_top1"]
    assert scores["monitored"] == monitored  # the same features, bank and BN statistics as the monitor's
    assert all(scores[name] != monitored for name in ("other layer", "other encoder", "other centring"))  # other features
