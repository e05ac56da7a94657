"""MoCo v3 (moco_xla/moco_v3.py, vit.py, optim.py): loss, momentum and lr schedules, the frozen patch
projection, 4 gloo replicas against one process on the global batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_gloo
import mocov3_fns
from moco_xla.config import load_config
from moco_xla.errors import UserError
from moco_xla.moco_v3 import MoCoV3, SyncBatchNorm1d, momentum_at
from moco_xla.optim import LARS
from moco_xla.schedule import lr_at_step, peak_lr
from moco_xla.runtime import make_runtime
from moco_xla.train import build_model, build_optimizer, step_schedule
from moco_xla.vit import MoCoViT, sincos_position_embedding


def tiny_model(sets: list[str] | None = None, config: str = "mocov3_digits") -> tuple[MoCoV3, object]:
    cfg = load_config(config, mocov3_fns.TINY + (sets or []))
    return build_model(cfg, make_runtime("local")), cfg


def _ctr(q: torch.Tensor, k: torch.Tensor, T: float) -> float:
    """Hand-written: 2T * mean_i -log(exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T)), q and k normalised."""
    total = 0.0
    for i in range(q.shape[0]):
        num = math.exp(float(q[i] @ k[i]) / T)
        den = sum(math.exp(float(q[i] @ k[j]) / T) for j in range(k.shape[0]))
        total += -math.log(num / den)
    return 2 * T * total / q.shape[0]


def test_loss_equals_hand_computation_on_a_tiny_batch():
    model, cfg = tiny_model(["moco.T=0.5"])
    model.set_momentum(0.0)  # the key encoder becomes a copy of the query encoder before the keys
    x1, x2 = mocov3_fns.global_views(6)
    loss, stats = model(x1, x2)
    with torch.no_grad():
        q1, q2 = (F.normalize(model.predictor(model.encoder_q(x)), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(model.encoder_q(x), dim=1) for x in (x1, x2))  # m = 0: same weights
    want = _ctr(q1, k2, 0.5) + _ctr(q2, k1, 0.5)
    assert abs(float(loss.detach()) - want) < 1e-4, (float(loss.detach()), want)
    acc = ((q1 @ k2.t()).argmax(1) == torch.arange(6)).float().mean() / 2 + \
        ((q2 @ k1.t()).argmax(1) == torch.arange(6)).float().mean() / 2
    assert float(stats["acc"]) == pytest.approx(float(acc))
    for p in model.encoder_k.parameters():  # only momentum trains the key encoder
        assert p.grad is None and not p.requires_grad
    assert model.uniform_loss() == pytest.approx(4 * 0.5 * math.log(cfg.train.batch_size))


def test_heads_follow_the_official_builder():
    resnet, _ = tiny_model()
    proj = [type(m).__name__ for m in resnet.encoder_q.head]
    assert proj == ["Linear", "SyncBatchNorm1d", "ReLU", "Linear", "SyncBatchNorm1d"]  # 2 layers
    assert [type(m).__name__ for m in resnet.predictor] == ["Linear", "SyncBatchNorm1d", "ReLU", "Linear"]
    assert not resnet.encoder_q.head[-1].affine and all(not m.bias for m in resnet.predictor[::3])
    vit, _ = tiny_model(["model.arch=small_vit", "model.width=16", "model.patch_size=4",
                         "train.optimizer=adamw"])
    assert sum(isinstance(m, torch.nn.Linear) for m in vit.encoder_q.head) == 3  # 3-layer projector
    assert isinstance(vit.predictor[-1], SyncBatchNorm1d)  # the ViT predictor ends in BN
    deeper, _ = tiny_model(["moco.proj_layers=3"])
    assert sum(isinstance(m, torch.nn.Linear) for m in deeper.encoder_q.head) == 3


def test_momentum_schedule_rises_to_one_on_a_cosine():
    assert momentum_at(0.99, 0.0) == pytest.approx(0.99)
    assert momentum_at(0.99, 0.5) == pytest.approx(0.995)
    assert momentum_at(0.99, 1.0) == pytest.approx(1.0)
    model, cfg = tiny_model(["train.epochs=4", "train.warmup_epochs=1", "train.lr=0.5"])
    opt = build_optimizer(cfg, model)
    before = step_schedule(cfg, model, opt, steps_per_epoch=10)
    ms, lrs = [], []
    for step in range(40):
        lrs.append(before(step))
        ms.append(model.m)
        assert opt.param_groups[0]["lr"] == lrs[-1]
    assert ms[0] == pytest.approx(0.99) and all(b > a for a, b in zip(ms, ms[1:])) and ms[-1] < 1.0
    assert ms[20] == pytest.approx(momentum_at(0.99, 0.5))
    peak = peak_lr(cfg.train)
    assert peak == pytest.approx(0.5 * 16 / 256)  # scale_lr: base lr x batch / 256
    assert lrs[:10] == pytest.approx([peak * (s + 1) / 11 for s in range(10)])  # warm-up, never 0
    assert lrs[10] == pytest.approx(peak) and all(b > a for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(b < a for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0
    assert lrs[25] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    # the update uses the momentum the schedule set
    model.set_momentum(0.25)
    q, k = next(model.encoder_q.parameters()), next(model.encoder_k.parameters())
    with torch.no_grad():
        k.copy_(q + 1.0)
    want = 0.25 * (q + 1.0) + 0.75 * q
    model.momentum_update_key_encoder()
    torch.testing.assert_close(k, want.detach())
    assert lr_at_step(cfg.train, 39, 10) > 0


def test_frozen_patch_projection_stays_frozen_and_positions_are_sincos():
    model, cfg = tiny_model(["model.arch=small_vit", "model.width=16", "model.patch_size=4",
                             "train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.1"])
    vit = model.encoder_q.backbone
    assert isinstance(vit, MoCoViT) and vit.class_token.shape == (1, 1, 16)
    frozen = {"conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"}
    assert {n for n, p in vit.named_parameters() if not p.requires_grad} == frozen
    pe = vit.encoder.pos_embedding
    torch.testing.assert_close(pe, sincos_position_embedding(4, 16))
    assert pe.shape == (1, 17, 16) and torch.equal(pe[0, 0], torch.zeros(16))  # class token: no position
    assert torch.equal(pe[0, 1, :4], torch.zeros(4)) and torch.equal(pe[0, 1, 4:8], torch.ones(4))
    assert len({tuple(r.tolist()) for r in pe[0, 1:]}) == 16  # one code per patch
    opt = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    x1, x2 = mocov3_fns.global_views(8)
    for _ in range(3):
        loss, _ = model(x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in vit.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n  # no gradient and no weight decay
        else:
            assert not torch.equal(p, before[n]), n
    assert torch.equal(model.encoder_k.backbone.conv_proj.weight, vit.conv_proj.weight)


def test_lars_skips_weight_decay_and_adaptation_for_vectors():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))
    b = torch.nn.Parameter(torch.full((2,), 2.0))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.full((2, 2), 1.0), torch.full((2,), 1.0)
    opt.step()
    dp = torch.full((2, 2), 1.0 + 0.1 * 2.0)  # gradient + weight decay, rescaled to 0.001 |w| / |dp|
    want_w = 2.0 - 0.5 * dp * (0.001 * 4.0 / float(dp.norm()))
    torch.testing.assert_close(w.detach(), want_w)
    torch.testing.assert_close(b.detach(), torch.full((2,), 2.0 - 0.5 * 1.0))  # plain momentum SGD


def test_v3_config_errors_name_the_key():
    with pytest.raises(UserError, match="model.arch.*moco.version=3"):
        load_config("digits", ["model.arch=small_vit"])
    with pytest.raises(UserError, match="model.patch_size.*divide data.image_size=16"):
        load_config("mocov3_vit_digits", ["model.patch_size=5"])
    with pytest.raises(UserError, match="moco.version.*valid: 1, 2, 3"):
        load_config("mocov3_digits", ["moco.version=4"])
    with pytest.raises(UserError, match="train.optimizer.*lars is MoCo v3's"):
        load_config("digits", ["train.optimizer=lars"])
    load_config("mocov3_digits", ["moco.K=7"])  # v3 has no queue: K is not checked


@pytest.mark.parametrize("world", [4])
def test_four_gloo_replicas_equal_one_process_on_the_global_batch(world):
    per = 4
    res = run_gloo(mocov3_fns.v3_step, world, per, mocov3_fns.TINY)
    ref = mocov3_fns.v3_step(make_runtime("local"), per * world, mocov3_fns.TINY)
    assert ref["logits"].shape == (per * world, per * world)
    for r, out in enumerate(res):
        rows = slice(r * per, (r + 1) * per)
        torch.testing.assert_close(out["k1"], ref["k1"][rows], rtol=1e-4, atol=1e-5)  # SyncBN: global stats
        torch.testing.assert_close(out["k2"], ref["k2"][rows], rtol=1e-4, atol=1e-5)
        assert out["logits"].shape == (per, per * world)  # every replica's keys are the negatives
        torch.testing.assert_close(out["logits"], ref["logits"][rows], rtol=1e-4, atol=1e-4)
        assert torch.equal(out["labels"], torch.arange(per) + r * per)
        assert out["grads"].keys() == ref["grads"].keys() and all(g is None for g in out["key_grads"])
        for name, g in ref["grads"].items():  # averaged over replicas = the global-batch gradient
            torch.testing.assert_close(out["grads"][name], g, rtol=1e-3, atol=1e-5, msg=name)
    mean_loss = torch.stack([out["loss"] for out in res]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-5, atol=1e-5)
    # the equality is not trivial: BN over one replica's slice alone gives other keys
    model, _ = tiny_model()
    model.set_momentum(0.9)
    model(*mocov3_fns.global_views(per * world))  # the same momentum update as the reference
    x1, _ = mocov3_fns.global_views(per * world)
    local = torch.cat([model.key(x1[r * per:(r + 1) * per]) for r in range(world)])
    assert (local - ref["k1"]).abs().max() > 1e-3


def v3_table() -> list[dict[str, str]]:
    from moco_xla.config import CONFIG_DIR
    section = (CONFIG_DIR / "README.md").read_text().split("## MoCo v3")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    return [dict(zip(split(lines[0]), split(ln))) for ln in lines[2:]]


@pytest.mark.parametrize("row", v3_table(), ids=lambda r: r["arch"])
def test_v3_table_is_what_the_configs_resolve_to(row):
    name = row["launch arguments"].strip("`").split()[-1]
    cfg = load_config(name)
    t, m, p = cfg.train, cfg.moco, cfg.eval.probe
    assert m.version == 3 and cfg.model.arch == row["arch"] and t.optimizer == row["optimizer"]
    layers, widths = row["projector"].split(" layers, ")
    assert m.proj_layers == int(layers) and widths == f"{m.mlp_dim}-{cfg.model.dim}"
    assert t.batch_size == int(row["batch"]) and t.scale_lr
    assert math.isclose(t.lr, float(row["base lr"])) and math.isclose(t.weight_decay, float(row["wd"]))
    assert math.isclose(m.T, float(row["T"])) and math.isclose(m.m, float(row["m"]))
    assert t.warmup_epochs == int(row["warm-up"]) and t.epochs == int(row["epochs"]) and t.schedule == "cosine"
    lr, batch, epochs = (float(v) for v in row["linear probe (lr, batch, epochs)"].split(", "))
    assert (p.lr, p.batch_size, p.epochs, p.schedule, p.weight_decay, p.normalize, p.augment) == \
        (lr, batch, epochs, "cosine", 0.0, False, True)
    base = 0.1 if cfg.model.arch.startswith("resnet") else 3.0  # main_lincls.py's base lr x 1024 / 256
    assert math.isclose(p.lr, base * p.batch_size / 256)
    assert row["published result"] in ("72.8% linear top-1", "73.2% linear top-1", "76.7% linear top-1")
    assert (cfg.model.arch == "vit_small") == (row["published result"] == "73.2% linear top-1")



def test_logits_and_loss_stay_fp32_under_bf16_autocast():
    model, _ = tiny_model()
    x1, x2 = mocov3_fns.global_views(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.query(x1)
        logits, _ = model.logits(q, model.key(x2))
        loss, stats = model(x1, x2)
    assert q.dtype == torch.bfloat16  # the encoders ran in bf16 ...
    assert logits.dtype == loss.dtype == torch.float32  # ... the softmax over the batch did not
    loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
