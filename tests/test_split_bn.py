"""Split BN normalises contiguous sub-batches (a view, no relayout on a TPU): the same statistics per
sub-batch as BatchNorm on that slice, the same running statistics as the channel-folding layout it
replaced, checkpoints of either layout load, and the keys' sub-batches are not the queries'."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_xla.models import SplitBatchNorm, build_encoder


class FoldedSplitBatchNorm(nn.BatchNorm2d):
    """The previous layout (official CIFAR-10 demo): batch folded into channels, sample i in group i % g."""

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_splits
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(x.reshape(-1, c * g, h, w), mean, var, self.weight.repeat(g), self.bias.repeat(g),
                           True, self.momentum, self.eps).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(dim=0))
            self.running_var.copy_(var.view(g, c).mean(dim=0))
        return out


def _batch(n: int = 16, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, 5, 5, generator=g) * 2 + torch.arange(n).view(n, 1, 1, 1)


def test_each_contiguous_sub_batch_is_normalised_on_its_own():
    bn = SplitBatchNorm(3, num_splits=4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = _batch()
    y = bn(x)
    for j in range(4):  # sub-batch j: samples 4j .. 4j+3
        ref = F.batch_norm(x[4 * j:4 * j + 4], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        torch.testing.assert_close(y[4 * j:4 * j + 4], ref, rtol=1e-4, atol=1e-4)
    assert (y - F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)).abs().max() > 0.1  # not plain BN
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_same_outputs_gradients_and_running_statistics_as_the_folded_layout():
    """The folded layout's group j is samples j, j+g, ...: the new one on those samples made contiguous
    computes the same normalisation, gradients and running statistics (two steps of momentum)."""
    g, n = 4, 16
    new, old = SplitBatchNorm(3, num_splits=g), FoldedSplitBatchNorm(3, num_splits=g)
    strided_to_contiguous = torch.arange(n).view(n // g, g).t().reshape(-1)  # old group j first, in order
    for step in range(2):
        x = _batch() + step
        xo, xn = x.clone().requires_grad_(), x[strided_to_contiguous].clone().requires_grad_()
        yo, yn = old(xo), new(xn)
        torch.testing.assert_close(yn, yo[strided_to_contiguous], rtol=1e-4, atol=1e-4)
        w = torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(step))
        (yo * w).sum().backward()
        (yn * w[strided_to_contiguous]).sum().backward()
        torch.testing.assert_close(xn.grad, xo.grad[strided_to_contiguous], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(new.weight.grad, old.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(new.running_mean, old.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new.running_var, old.running_var, rtol=1e-5, atol=1e-5)


def test_checkpoints_of_either_layout_load_and_evaluate_alike():
    old = FoldedSplitBatchNorm(3, num_splits=4)
    old(_batch())  # running statistics moved
    new = SplitBatchNorm(3, num_splits=4)
    assert {k: v.shape for k, v in new.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    new.load_state_dict(old.state_dict())  # strict: same keys, same shapes
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(new.state_dict())  # what an exported backbone's plain BN reads
    x = _batch()
    torch.testing.assert_close(new.eval()(x), old.eval()(x))
    torch.testing.assert_close(plain.eval()(x), old(x))


def test_keys_are_normalised_in_other_sub_batches_than_their_queries(tiny_cfg):
    """One replica, Split BN 4, shuffle gather: the key encoder sees the permuted batch, so a key's
    sub-batch is a random set of samples, not its query's; the keys are then put back in order."""
    from moco_xla.moco import MoCo
    from moco_xla.runtime import make_runtime
    from moco_xla.shuffle import shuffled_keys
    tiny_cfg.model.bn_splits = 4
    torch.manual_seed(0)
    model = MoCo(build_encoder(tiny_cfg.model), make_runtime("local"), tiny_cfg.model.dim, 64)
    x = torch.randn(16, 1, 16, 16) + torch.linspace(-2, 2, 16).view(16, 1, 1, 1)
    with torch.no_grad():
        keys, perm = shuffled_keys(model.rt, model.encoder_k, x, "gather")
        torch.testing.assert_close(keys, model.encoder_k(x[perm])[torch.argsort(perm)], rtol=1e-4, atol=1e-5)
        in_place = model.encoder_k(x)  # the queries' sub-batches: the leak shuffle BN closes
    key_group = torch.argsort(perm) // 4  # sub-batch of each sample in the key encoder
    query_group = torch.arange(16) // 4
    assert not torch.equal(key_group, query_group)
    shared = [(key_group == key_group[i]) & (query_group == query_group[i]) for i in range(16)]
    assert sum(int(s.sum()) for s in shared) < 16 * 4  # the groups are not the same partition
    assert (keys - in_place).abs().max() > 1e-3  # other sub-batches, other statistics


def test_fused_per_slice_path_matches_the_grouped_one():
    """On the CPU each sub-batch goes through torch's fused batch norm: the same outputs, gradients
    (input, weight, bias) and running statistics as the one-graph path XLA and CUDA take."""
    fused, grouped = SplitBatchNorm(3, num_splits=4), SplitBatchNorm(3, num_splits=4)
    with torch.no_grad():
        for bn in (fused, grouped):
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    for step in range(2):
        x = _batch() + step
        xf, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yg = fused(xf), grouped._grouped(xg)
        assert yf.grad_fn.name().startswith("Cat")  # forward on the CPU took the fused path
        torch.testing.assert_close(yf, yg, rtol=1e-4, atol=1e-4)
        w = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(step))
        (yf * w).sum().backward()
        (yg * w).sum().backward()
        torch.testing.assert_close(xf.grad, xg.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.weight.grad, grouped.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.bias.grad, grouped.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.running_mean, grouped.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.running_var, grouped.running_var, rtol=1e-5, atol=1e-5)
