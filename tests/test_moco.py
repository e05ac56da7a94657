"""The MoCo algorithm on one replica: queue, momentum update, InfoNCE, symmetric loss, Split BN."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_xla.models import SplitBatchNorm, build_encoder
from moco_xla.moco import MoCo, infonce
from moco_xla.runtime import make_runtime


def linear_moco(K: int = 8, dim: int = 3, m: float = 0.9, T: float = 0.5, symmetric: bool = False,
                debias: float = 0.0, nn_weight: float = 0.0) -> MoCo:
    torch.manual_seed(0)
    enc = nn.Linear(4, dim, bias=False)
    return MoCo(enc, make_runtime("local"), dim=dim, K=K, m=m, T=T, symmetric=symmetric, shuffle="gather",
                debias=debias, nn_weight=nn_weight)


def test_queue_enqueue_order_and_wrap_around():
    model = linear_moco(K=8, dim=3)
    batches = [torch.full((3, 3), float(i + 1)) for i in range(3)]  # 9 keys into a queue of 8
    for b in batches:
        model.dequeue_and_enqueue(b)
    # columns 0..7 were written by keys 1..8; key 9 wrapped around to column 0
    expected = torch.tensor([3, 1, 1, 2, 2, 2, 3, 3], dtype=torch.float32)
    assert torch.equal(model.queue[0], expected)
    assert int(model.queue_ptr) == 9 % 8
    model.dequeue_and_enqueue(torch.full((3, 3), 4.0))
    assert torch.equal(model.queue[0], torch.tensor([3, 4, 4, 4, 2, 2, 3, 3], dtype=torch.float32))
    assert int(model.queue_ptr) == 4


def test_momentum_update():
    """The update uses the constructor's m, then the m set_momentum sets (moco.m_cosine's schedule)."""
    model = linear_moco(m=0.9)
    with torch.no_grad():
        model.encoder_q.weight.fill_(1.0)
        model.encoder_k.weight.fill_(3.0)
    model.momentum_update_key_encoder()
    torch.testing.assert_close(model.encoder_k.weight, torch.full_like(model.encoder_k.weight, 0.9 * 3 + 0.1 * 1))
    assert not model.encoder_k.weight.requires_grad
    model.set_momentum(0.25)
    model.momentum_update_key_encoder()
    torch.testing.assert_close(model.encoder_k.weight, torch.full_like(model.encoder_k.weight, 0.25 * 2.8 + 0.75 * 1))


def test_m_cosine_raises_the_v2_key_momentum_to_one_and_leaves_the_lr_per_epoch():
    """moco.m_cosine: before every step the schedule sets MoCo v3's cosine momentum (m to 1 over the
    run; the update uses it: test_momentum_update); the lr stays the epoch's (set once an epoch, as
    without it); without the setting there is no per-step schedule."""
    from moco_xla.config import load_config
    from moco_xla.moco_v3 import momentum_at
    from moco_xla.schedule import lr_at_epoch
    from moco_xla.train import build_model, build_optimizer, step_schedule
    sets = ["train.epochs=4", "moco.m=0.99", "moco.m_cosine=true"]
    cfg = load_config("tiny", sets)
    model = build_model(cfg, make_runtime("local"))
    assert isinstance(model, MoCo)
    opt = build_optimizer(cfg, model)
    opt.param_groups[0]["lr"] = 123.0
    before = step_schedule(cfg, model, opt, steps_per_epoch=10)
    ms, lrs = [], []
    for step in range(40):
        lrs.append(before(step))
        ms.append(model.m)
    assert ms[0] == pytest.approx(0.99) and ms[20] == pytest.approx(momentum_at(0.99, 0.5))
    assert all(b > a for a, b in zip(ms, ms[1:])) and ms[-1] < 1.0
    assert lrs == pytest.approx([lr_at_epoch(cfg.train, s // 10) for s in range(40)])
    assert opt.param_groups[0]["lr"] == 123.0  # the epoch loop sets the lr, not the step schedule
    plain = load_config("tiny", sets[:2])
    assert step_schedule(plain, build_model(plain, make_runtime("local")), opt, steps_per_epoch=10) is None


def test_nn_warmup_raises_the_nearest_key_share_linearly_on_the_device():
    """moco.nn_warmup_epochs: step_schedule gives the model the warm-up in steps (and no per-step
    schedule where nothing else needs one); the model's share of the nearest-key loss rises linearly to
    nn_weight over those steps, counted by a device buffer (checkpointed with the model), and each
    step's loss is that mix of the two InfoNCE terms."""
    from moco_xla.config import load_config
    from moco_xla.train import build_model, build_optimizer, step_schedule
    cfg = load_config("tiny", ["train.epochs=4", "moco.nn_weight=0.8", "moco.nn_warmup_epochs=2"])
    model = build_model(cfg, make_runtime("local"))
    assert step_schedule(cfg, model, build_optimizer(cfg, model), steps_per_epoch=10) is None
    assert model.nn_warmup_steps == 20 and "nn_step" in model.state_dict()
    mixed = linear_moco(K=8, m=0.0, T=0.5, nn_weight=0.8)
    mixed.nn_warmup_steps = 4
    f = lambda x: F.normalize(x @ mixed.encoder_q.weight.t(), dim=1).detach()  # noqa: E731
    for step in range(6):
        x_q, x_k = torch.randn(4, 4), torch.randn(4, 4)
        queue = mixed.queue.clone()
        loss, _ = mixed(x_q, x_k)
        share = 0.8 * min(1.0, (step + 1) / 4)
        want = (1 - share) * _infonce(f(x_q), f(x_k), queue, 0.5) + share * _nn_infonce(f(x_q), f(x_k), queue, 0.5)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert int(mixed.nn_step) == 6


def _infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """Hand-written InfoNCE: -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.n_j/T))), averaged."""
    losses = []
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / T)
        neg = sum(math.exp(float(q[i] @ queue[:, j]) / T) for j in range(queue.shape[1]))
        losses.append(-math.log(pos / (pos + neg)))
    return torch.tensor(sum(losses) / len(losses))


def test_loss_equals_hand_computed_infonce():
    model = linear_moco(K=8, m=0.0, T=0.5)  # m=0: key encoder copies the query encoder
    x_q, x_k = torch.randn(2, 4), torch.randn(2, 4)
    queue = model.queue.clone()
    loss, stats = model(x_q, x_k)
    q = F.normalize(x_q @ model.encoder_q.weight.t(), dim=1)
    k = F.normalize(x_k @ model.encoder_q.weight.t(), dim=1)
    torch.testing.assert_close(loss, _infonce(q.detach(), k.detach(), queue, 0.5), rtol=1e-5, atol=1e-5)
    # the keys were enqueued after the loss was computed
    torch.testing.assert_close(model.queue[:, :2], k.detach().t())


def _debiased_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float, tau_plus: float) -> torch.Tensor:
    """Hand-written debiased InfoNCE (Chuang et al. 2020, their code's form): the negatives' sum less
    tau_plus of N positives, over 1 - tau_plus, floored at N exp(-1/T)."""
    losses = []
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / T)
        negs = [math.exp(float(q[i] @ queue[:, j]) / T) for j in range(queue.shape[1])]
        n = len(negs)
        ng = max((sum(negs) - tau_plus * n * pos) / (1 - tau_plus), n * math.exp(-1 / T))
        losses.append(-math.log(pos / (pos + ng)))
    return torch.tensor(sum(losses) / len(losses))


@pytest.mark.parametrize("T", [0.5, 0.01])  # at T 0.01, exp(1 / T) is past float32's range
def test_debiased_loss_equals_hand_computed_form(T):
    """moco.debias=tau+: the loss is the debiased InfoNCE, not InfoNCE, on the same queries, keys and queue."""
    model = linear_moco(K=8, m=0.0, T=T, debias=0.1)
    x_q, x_k = torch.randn(4, 4), torch.randn(4, 4)
    queue = model.queue.clone()
    loss, _ = model(x_q, x_k)
    f = lambda x: F.normalize(x @ model.encoder_q.weight.t(), dim=1).detach()  # noqa: E731
    want = _debiased_infonce(f(x_q), f(x_k), queue, T, 0.1)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    assert abs(float(loss) - float(_infonce(f(x_q), f(x_k), queue, T))) > 1e-3  # not plain InfoNCE


def _nn_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """Hand-written InfoNCE whose positive is the queue key nearest (cosine) to each key, over the
    other K - 1 keys as negatives."""
    losses = []
    for i in range(q.shape[0]):
        nearest = int((k[i] @ queue).argmax())
        others = [j for j in range(queue.shape[1]) if j != nearest]
        logits = torch.cat([(q[i] @ queue[:, nearest])[None], q[i] @ queue[:, others]]) / T
        losses.append(-F.log_softmax(logits, dim=0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_nn_weight_mixes_the_key_and_the_queues_nearest_key_as_positives(weight):
    """moco.nn_weight w: the loss is (1 - w) InfoNCE with the key as the positive plus w InfoNCE with
    the queue's nearest key to the key as the positive (that key then no negative); the key itself is
    enqueued, as without it."""
    model = linear_moco(K=8, m=0.0, T=0.5, nn_weight=weight)
    x_q, x_k = torch.randn(4, 4), torch.randn(4, 4)
    queue = model.queue.clone()
    loss, _ = model(x_q, x_k)
    f = lambda x: F.normalize(x @ model.encoder_q.weight.t(), dim=1).detach()  # noqa: E731
    q, k = f(x_q), f(x_k)
    plain = _infonce(q, k, queue, 0.5)
    want = (1 - weight) * plain + weight * _nn_infonce(q, k, queue, 0.5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(plain)) > 1e-3  # not the key alone as the positive
    torch.testing.assert_close(model.queue[:, :4], k.t())  # the keys themselves join the queue


def test_debiased_loss_floor_and_uniform_logits():
    """Where the positive outweighs the negatives' sum the corrected sum is floored at N exp(-1/T);
    uniform logits cost ln(K + 1) with or without the correction (the collapse detector's line)."""
    T, logits = 0.1, torch.tensor([[10.0, -10.0, -10.0, -10.0]])  # cosine 1 against three cosines of -1
    floor = 3 * math.exp(-1 / T)
    torch.testing.assert_close(infonce(logits, 0.5, T), torch.tensor(math.log(math.exp(10) + floor) - 10))
    uniform = torch.full((2, 9), 3.0)
    for tau_plus in (0.0, 0.1):
        torch.testing.assert_close(infonce(uniform, tau_plus, 0.5), torch.tensor(math.log(9)))


def test_symmetric_loss_is_sum_of_both_directions():
    model = linear_moco(K=8, m=0.0, T=0.5, symmetric=True)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    queue = model.queue.clone()
    loss, _ = model(x1, x2)
    f = lambda x: F.normalize(x @ model.encoder_q.weight.t(), dim=1).detach()  # noqa: E731
    want = _infonce(f(x1), f(x2), queue, 0.5) + _infonce(f(x2), f(x1), queue, 0.5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert int(model.queue_ptr) == 4  # both crops' keys were enqueued
    assert math.isclose(model.uniform_loss(), 2 * math.log(9))


def test_split_batchnorm_normalises_each_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4)
    x = torch.randn(16, 3, 5, 5) + torch.arange(16).view(16, 1, 1, 1)
    y = bn(x)
    for g in range(4):  # sub-batch g is the contiguous slice of samples 4g .. 4g+3
        ref = F.batch_norm(x[4 * g:4 * g + 4], None, None, training=True, eps=bn.eps)
        torch.testing.assert_close(y[4 * g:4 * g + 4], ref, rtol=1e-4, atol=1e-4)
    # plain BN over the whole batch would give something else
    assert (y - F.batch_norm(x, None, None, training=True)).abs().max() > 0.1
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_encoders_build_for_every_arch(tiny_cfg):
    for arch, stem, ch, size in [("small_resnet", True, 1, 16), ("resnet18", True, 3, 32),
                                 ("resnet18", False, 3, 64), ("resnet50", True, 1, 28)]:
        tiny_cfg.model.arch, tiny_cfg.model.small_stem, tiny_cfg.model.in_channels = arch, stem, ch
        enc = build_encoder(tiny_cfg.model)
        out = enc(torch.randn(4, ch, size, size))
        assert out.shape == (4, tiny_cfg.model.dim)
        if arch != "small_resnet" and stem:
            assert isinstance(enc.backbone.maxpool, nn.Identity) and enc.backbone.conv1.stride == (1, 1)
    assert sum(isinstance(m, SplitBatchNorm) for m in enc.modules()) > 0  # bn_splits=2 in tiny


def test_small_resnet_size_matches_the_quickstart_claim():
    from moco_xla.config import load_config
    cfg = load_config("digits")
    enc = build_encoder(cfg.model)
    n = sum(p.numel() for p in enc.backbone.parameters())
    assert 1.0e6 < n < 1.5e6


def test_small_resnet_depth_stacks_blocks_per_stage_and_keeps_depth_1s_names():
    """model.depth: BasicBlocks per stage; depth 1 is the network (and state dict names) it always was;
    pre-training's encoder and the eval command's backbone build the deeper one; other archs refuse it."""
    from moco_xla.config import load_config
    from moco_xla.errors import UserError
    from moco_xla.eval.encoder import build_eval_backbone
    from moco_xla.models import BasicBlock, SmallResNet
    shallow, deep = SmallResNet(1, 8), SmallResNet(1, 8, depth=3)
    assert sum(isinstance(m, BasicBlock) for m in shallow.modules()) == 4
    assert sum(isinstance(m, BasicBlock) for m in deep.modules()) == 12
    assert len(shallow.layers) == 4 and "layers.3.downsample.0.weight" in shallow.state_dict()  # its old names
    assert len(deep.layers) == 12 and "layers.9.downsample.0.weight" in deep.state_dict()  # stage 4's first block
    assert deep(torch.randn(2, 1, 16, 16)).shape == (2, 64) and deep.out_dim == shallow.out_dim == 64
    cfg = load_config("tiny", ["model.depth=2"])
    assert sum(isinstance(m, BasicBlock) for m in build_encoder(cfg.model).modules()) == 8
    assert sum(isinstance(m, BasicBlock) for m in build_eval_backbone(cfg)[0].modules()) == 8
    with pytest.raises(UserError, match=r"model.depth.*must be >= 1, got 0"):
        load_config("tiny", ["model.depth=0"])
    with pytest.raises(UserError, match=r"model.depth.*model.arch=resnet18.*valid: model.depth=1, or model.arch"):
        load_config("tiny", ["model.depth=2", "model.arch=resnet18", "model.in_channels=3"])
