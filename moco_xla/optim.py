"""Optimizer helpers shared by pre-training, evaluation and the benchmark."""
from __future__ import annotations

import torch

from .schedule import peak_lr


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Start every SGD momentum buffer at zero: the first step then runs the same graph as all others.

    SGD creates the buffers as a copy of the first gradient; 0 * m + g is that same copy
    (dampening is 0), so the numbers do not change, but on XLA it saves compiling a whole
    second step graph (minutes for a ResNet-50 on a TPU). The zeros are made on the host and
    copied: on XLA that is device data, where ``zeros_like`` on the device would be a graph
    node folded into (and so changing) the first step's graph.
    """
    for group in optimizer.param_groups:
        if group.get("momentum") and not group.get("dampening"):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros(p.shape, dtype=p.dtype).to(p.device))


class LARS(torch.optim.Optimizer):
    """LARS as in facebookresearch/moco-v3 (moco/optimizer.py): SGD with momentum whose update of
    each weight matrix / conv kernel is rescaled to ``trust_coefficient * |w| / |g + wd * w|``.

    Parameters with ndim <= 1 (BN gamma/beta, biases) get neither weight decay nor the rescaling.
    ``lr`` may change every step as a Python float: on XLA it reaches the graph as data
    (no recompilation) as long as it is never exactly 0 or 1.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim.Optimizer's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not a normalisation gamma/beta or a bias
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    dp = dp * torch.where((param_norm > 0) & (update_norm > 0), trust,
                                          torch.ones_like(trust))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = _host_zeros(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _host_zeros(p: torch.Tensor) -> torch.Tensor:
    """Zeros made on the host and copied: device data on XLA, not a graph node of the first step."""
    return torch.zeros(p.shape, dtype=p.dtype).to(p.device)


def prime_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every optimizer state buffer before the first step (SGD, LARS, Adam/AdamW), so that
    step 1 runs the same graph as every later step (see prime_momentum)."""
    if isinstance(optimizer, LARS):
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p].setdefault("mu", _host_zeros(p))
    elif isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam
        for group in optimizer.param_groups:
            if group.get("fused") or group.get("amsgrad"):
                continue  # their own state layout: left to torch
            for p in group["params"]:
                state = optimizer.state[p]
                if not state:  # the layout Adam._init_group makes (``step`` on the host unless capturable)
                    step = torch.tensor(0.0)
                    state["step"] = step.to(p.device) if group.get("capturable") else step
                    state["exp_avg"], state["exp_avg_sq"] = _host_zeros(p), _host_zeros(p)
    else:
        prime_momentum(optimizer)


OPTIMIZERS = ("sgd", "lars", "adamw")


def build_optimizer(train_cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable ``params``, state primed, at the peak lr.

    sgd: momentum SGD (MoCo v1/v2); lars: MoCo v3 ResNets; adamw: MoCo v3 ViTs (betas 0.9, 0.999
    as main_moco.py). No gradient clipping: the v3 recipe has none.
    """
    t, lr = train_cfg, peak_lr(train_cfg)
    params = [p for p in params if p.requires_grad]  # frozen patch projection, position embedding
    if t.optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(params, lr, weight_decay=t.weight_decay, momentum=t.momentum)
    elif t.optimizer == "adamw":
        # On XLA the bias corrections must stay on the device (capturable): as Python floats they
        # reach 1.0 exactly after ~37k steps, a value torch_xla bakes into the graph (a recompile).
        capturable = bool(params) and params[0].device.type == "xla"
        opt = torch.optim.AdamW(params, lr, weight_decay=t.weight_decay, capturable=capturable)
    elif t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {t.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    prime_state(opt)
    return opt
