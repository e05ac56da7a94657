"""MoCo: a query encoder, a momentum key encoder, a queue of negative keys, InfoNCE.

Read alongside the official builder (facebookresearch/moco, moco/builder.py): the
same steps under the paper's names. What differs is what a TPU needs: the queue
pointer is a device tensor (no ``int(ptr)``, which syncs and recompiles every
step), the momentum update is one fused foreach op, collectives go through the
Runtime, and nothing is read back to the host here.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import Runtime
from .shuffle import resolve_mode, shuffled_keys


class MoCo(nn.Module):
    """MoCo v1/v2. ``forward(im_q, im_k)`` returns (loss, {'loss', 'acc'}), all device tensors."""

    def __init__(self, encoder_q: nn.Module, runtime: Runtime, dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.07, symmetric: bool = False,
                 shuffle: str = "gather", debias: float = 0.0, nn_weight: float = 0.0) -> None:
        super().__init__()
        self.rt = runtime
        self.K, self.m, self.T = K, m, T
        self.debias = debias  # tau+: the share of the queue's keys expected to be of the query's class
        self.nn_weight = nn_weight  # the loss's share whose positive is the queue's nearest key to the key
        self.nn_warmup_steps = 0  # steps over which that share rises from 0 (moco.nn_warmup_epochs; step_schedule)
        self.symmetric = symmetric
        self.shuffle = resolve_mode(runtime, shuffle)  # all_to_all falls back to gather where missing
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)  # same init; trained only by momentum
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if nn_weight > 0:  # steps taken, for the warm-up: a device counter, as the queue pointer
            self.register_buffer("nn_step", torch.zeros(()))

    def set_momentum(self, m: float) -> None:
        """The momentum of the next step's update (moco.m_cosine: the schedule sets it every step)."""
        self.m = m

    def nn_share(self) -> torch.Tensor | float:
        """This step's share of the loss whose positive is the queue's nearest key: nn_weight, or during
        the warm-up nn_weight (step + 1) / nn_warmup_steps, computed on the device (no host value)."""
        if not self.nn_warmup_steps:
            return self.nn_weight
        return self.nn_weight * ((self.nn_step + 1) / self.nn_warmup_steps).clamp(max=1.0)

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, as one fused foreach op."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch of keys over the oldest ones; the pointer stays on the device."""
        keys = self.rt.all_gather(keys)
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.K
        self.queue.index_copy_(1, idx, keys.t().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def query(self, im_q: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(im_q).float(), dim=1)

    @torch.no_grad()
    def key(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys from the momentum encoder, with shuffle BN across replicas."""
        k, _ = shuffled_keys(self.rt, self.encoder_k, im_k, self.shuffle)
        return F.normalize(k.float(), dim=1)

    @torch.no_grad()
    def nearest_key(self, k: torch.Tensor, queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queue's key most similar to each key (cosine), and its column: NNCLR's positive
        (Dwibedi et al. 2021, "With a Little Help from My Friends"), the queue as its support set."""
        column = self.rt.precise_matmul(k, queue).argmax(dim=1)
        return queue.t()[column], column

    def contrastive_loss(self, im_q: torch.Tensor, im_k: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE with the positive at index 0; logits, softmax and loss in fp32. With ``nn_weight``
        > 0 that share of the loss is InfoNCE whose positive is the queue's nearest key to the key,
        that column of the queue no negative of its query (nn_weight 1: NNCLR's loss alone)."""
        q = self.query(im_q)
        k = self.key(im_k)
        # Under bf16/fp16 autocast q @ queue would run in low precision: bf16 keeps 8 bits
        # of mantissa, so at T = 0.07 a logit could be off by about 0.05. Keep this part fp32.
        with torch.autocast(q.device.type, enabled=False):
            queue = self.queue.clone().detach()
            l_pos = (q * k).sum(dim=1, keepdim=True)
            l_neg = self.rt.precise_matmul(q, queue)  # TPU: highest precision
            logits = torch.cat([l_pos, l_neg], dim=1) / self.T
            acc = (logits.argmax(dim=1) == 0).float().mean()
            loss = infonce(logits, self.debias, self.T)
            if self.nn_weight > 0:
                neighbour, column = self.nearest_key(k, queue)
                l_nn = (q * neighbour).sum(dim=1, keepdim=True)
                nn_logits = torch.cat([l_nn, l_neg.scatter(1, column[:, None], float("-inf"))], dim=1) / self.T
                w = self.nn_share()
                loss = (1 - w) * loss + w * infonce(nn_logits)
        return loss, acc, k

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.momentum_update_key_encoder()
        if self.symmetric:  # each crop is the query once (official CIFAR-10 demo)
            loss_12, acc_12, k2 = self.contrastive_loss(im_q, im_k)
            loss_21, acc_21, k1 = self.contrastive_loss(im_k, im_q)
            loss, acc, k = loss_12 + loss_21, (acc_12 + acc_21) / 2, torch.cat([k1, k2])
        else:
            loss, acc, k = self.contrastive_loss(im_q, im_k)
        self.dequeue_and_enqueue(k)
        if self.nn_weight > 0:
            self.nn_step.add_(1)
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    def uniform_loss(self) -> float:
        """The loss of uniform logits, ln(K+1) per view: where a collapsed run sits."""
        return math.log(self.K + 1) * (2 if self.symmetric else 1)


def infonce(logits: torch.Tensor, tau_plus: float = 0.0, T: float = 1.0) -> torch.Tensor:
    """InfoNCE on [N, 1 + K] logits (cosine / T) with the positive at index 0.

    ``tau_plus`` > 0: the debiased form (Chuang et al. 2020, "Debiased Contrastive Learning"): a
    share ``tau_plus`` of the K negatives is taken to be of the query's own class, so the negatives'
    sum is corrected by that share of the positive's term, ``(sum(neg) - tau_plus K pos) / (1 - tau_plus)``,
    and floored at K e^(-1/T), the least K cosine similarities can give. Computed on logits less
    their row's largest, the floor in the log domain: no exp overflows at any temperature.
    """
    if tau_plus == 0:
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)
    shift = logits.detach().amax(dim=1)
    z = logits - shift[:, None]
    n = z.shape[1] - 1
    pos, neg_sum = z[:, 0].exp(), z[:, 1:].exp().sum(dim=1)
    corrected = (neg_sum - tau_plus * n * pos) / (1 - tau_plus)
    log_floor = math.log(n) - 1 / T - shift  # K e^(-1/T) on the shifted scale
    log_neg = torch.maximum(corrected.clamp(min=torch.finfo(z.dtype).tiny).log(), log_floor)
    log_denominator = torch.stack([z[:, 0], log_neg]).logsumexp(dim=0)  # XLA lowers it (logaddexp falls back)
    return (log_denominator - z[:, 0]).mean()
