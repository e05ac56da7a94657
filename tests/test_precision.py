"""train.precision per backend: auto picks the fast type, bad combinations fail before training,
and the contrastive logits, softmax and loss stay fp32 under autocast.

(The XLA half, bf16 convolutions in the lowered graph, is in tests/test_xla_lowering.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moco_xla.config import load_config
from moco_xla.errors import UserError
from moco_xla.launch import main as launch_main
from moco_xla.models import build_encoder
from moco_xla.moco import MoCo
from moco_xla.runtime import make_runtime, resolve_precision


@pytest.mark.parametrize("backend,want", [("xla", "bf16"), ("cpu", "fp32"), ("cuda", "bf16")])
def test_auto_precision_per_backend(backend, want):
    assert resolve_precision(backend, "auto") == want


@pytest.mark.parametrize("backend,precision", [("xla", "fp16"), ("cpu", "fp16")])
def test_unsupported_combination_is_a_user_error(backend, precision):
    with pytest.raises(UserError, match=rf"train.precision={precision} is not supported on backend "
                                        rf"{backend}.*valid: auto, fp32, bf16$"):
        resolve_precision(backend, precision)


def test_launcher_rejects_fp16_on_cpu_with_one_line(capsys, tmp_path):
    code = launch_main(["--backend", "cpu", "--config", "tiny", "--out", str(tmp_path / "r"),
                        "--set", "train.precision=fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "fp16" in err[0]
    assert not (tmp_path / "r" / "summary.json").exists()


def _moco(rt) -> MoCo:
    cfg = load_config("tiny", ["model.bn_splits=1", "model.width=4"])
    torch.manual_seed(0)
    return MoCo(build_encoder(cfg.model, rt), rt, cfg.model.dim, 64, 0.99, 0.07, shuffle="none")


def test_cpu_fp32_is_plain_fp32():
    rt = make_runtime("cpu")
    conv = torch.nn.Conv2d(1, 2, 3)
    with rt.autocast("auto"):
        assert conv(torch.randn(1, 1, 5, 5)).dtype == torch.float32
    assert rt.grad_scaler("auto") is None


def test_logits_and_loss_fp32_under_bf16_autocast():
    rt = make_runtime("cpu")
    model = _moco(rt)
    g = torch.Generator().manual_seed(1)
    im_q, im_k = torch.randn(8, 1, 16, 16, generator=g), torch.randn(8, 1, 16, 16, generator=g)
    with rt.autocast("bf16"):
        conv_out = model.encoder_q.backbone.conv1(im_q)
        loss, _acc, k = model.contrastive_loss(im_q, im_k)
        q = model.query(im_q)
    assert conv_out.dtype == torch.bfloat16  # the encoder does run in bf16
    assert loss.dtype == torch.float32 and k.dtype == torch.float32
    # The same loss from the same q and k, computed in fp32 outside autocast. A bf16 q @ queue
    # (what autocast does to a matmul unless told not to) is off by ~1e-2 at T = 0.07.
    with torch.no_grad():
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue], dim=1) / model.T
        ref = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    assert abs(loss.item() - ref.item()) < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue], 1) / model.T,
                              torch.zeros(8, dtype=torch.long))
    assert abs(low.item() - ref.item()) > 1e-4  # the check above could tell the difference


def sync_bn_outputs(rt, per: int):
    """Run in a gloo replica: SyncBatchNorm on this replica's slice, in fp32 and under bf16 autocast."""
    from moco_xla.models import SyncBatchNorm
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(rt.world_size * per, 3, 4, 4, generator=g) * 3 + 5  # a mean far from 0
    x = x_all[rt.rank * per:(rt.rank + 1) * per]
    bn = SyncBatchNorm(3, rt)
    out = bn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bn(x.bfloat16())
    return {"x_all": x_all, "out": out.detach(), "low": low.detach(), "running_mean": bn.running_mean}


def test_sync_bn_equals_global_batch_norm_and_keeps_stats_fp32_under_bf16():
    from conftest import run_gloo
    world, per = 2, 4
    res = run_gloo(sync_bn_outputs, world, per)
    ref = F.batch_norm(res[0]["x_all"], None, None, training=True)  # BN over the global batch
    for rank, r in enumerate(res):
        want = ref[rank * per:(rank + 1) * per]
        torch.testing.assert_close(r["out"], want, rtol=1e-4, atol=1e-4)
        assert r["low"].dtype == torch.bfloat16
        # bf16 inputs, fp32 statistics: only the bf16 rounding of x and of the output remains
        assert (r["low"].float() - want).abs().max() < 0.05
        torch.testing.assert_close(r["running_mean"], res[0]["running_mean"])
