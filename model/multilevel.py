"""Multi-level feature optimisation (Qian et al., ICCV 2021, https://arxiv.org/abs/2108.02183), written from
notes/multilevel-and-evaluation.md Parts A, E and F (the reading of the released code, commit 3478734).

Input: per video three clips [B, 3, T, S, S] (pipeline outputs "clip_a", "clip_b", "clip_g"): A = frames
0..15 of 32 indices at a random step, B = frames 16..31, G = every second one of all 32. One backbone
forward on [A; B; G] (BatchNorm over all three, as in the reference) gives three levels:
* high: layer4, space-pooled to S4 steps [3B, C4, S4]; heads: instance (per step, then time mean),
  local-global (per step), graph (per step, then time mean), and the global head (time mean ->
  Linear-BN-ReLU-Linear -> L2-normalise -> prototypes, a bias-free Linear dim -> `cluster`).
* mid / low: layer3 / layer2, batched with its time-reversed copy ([forward; reversed], 6B rows) through a
  motion-excitation block (r3d_multilevel.py), space-pooled [6B, C, S]; heads: motion contrast (per step,
  time mean; forward and reversed rows), local-global and graph (forward rows only).
All heads are two-layer MLPs C -> C -> ReLU -> dim per time step (the reference's 1x1 Conv1d pairs).

Loss (multilevel_losses.py; tau = `temperature` = 0.07 everywhere, 0.1 in the prototype softmax):
    L = L_inst + L_lg,high + w_mid (L_motion,mid + L_lg,mid) + w_low (L_motion,low + L_lg,low)
        + w_proto L_proto + [epoch >= split] (L_graph,high + w_mid L_graph,mid + w_low L_graph,low)
with w_mid 0.5, w_low 0.3, w_proto 0.5. `term_weights()` gives the weight of every logged term, so
out["loss"] == sum(w * out[k] for k, w in term_weights().items()).
* Negatives come from the batch gathered over the real world size (multilevel_losses.gather, gradient
  through the gather by default: grad_gather="full"; "local" is the reference's).
* Prototypes: their weights are L2-renormalised at every training step (before the forward); Sinkhorn-
  Knopp (eps 0.05, 3 iterations) over the gathered logits, or from epoch `proto_queue_start` (10) over a queue of
  the last `proto_queue` (1024) videos' logits whose last rows are the current batch; the queue is a
  buffer (state_dict) updated at every training step from epoch 0 and starts as noise, as in the reference.
* Graph: G_ins from the gathered instance embeddings, G_sem from argmax(code_A + code_B); the target
  has no gradient.

Epoch-dependent behaviour; the trainer calls `set_epoch(epoch)` before the first step of every epoch
(also after a resume):
* epoch < freeze_prototype_epochs (1): the prototype layer must not move. epoch < split: the graph heads
  must not move. Both are always part of the graph (the graph terms enter with weight 0 before `split`),
  so DDP needs no find_unused_parameters; they get zero gradients. Zero is not "no update" for Adam with
  weight decay, so after backward and before optimizer.step() the trainer calls `drop_frozen_grads()`
  (sets .grad = None for `frozen_parameters()`, which optimizers skip; the reference does this for the
  prototypes and gets it for the graph heads from find_unused_parameters=True).
For the trainer: DDP with broadcast_buffers=False (the queue is identical on every rank); the reference
converts BatchNorm to SyncBatchNorm (nn.SyncBatchNorm.convert_sync_batchnorm) and uses Adam 1e-3, wd 1e-5.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import resolve_backbone
from .distributed import concat_all_gather
from .heads import Projector
from .multilevel_losses import (gather, graph_loss, graph_target, info_nce, instance_graph, instance_logits,
                                local_global_loss, motion_logits, proto_loss, sinkhorn, top1)
from .objective import Objective
from .r3d_multilevel import MotionExcitation, time_reversed_batch

LEVELS = ("high", "mid", "low")


class MultiLevel(Objective):
    """backbone: a registry name or zero-argument constructor of a backbone with `forward_levels` and
    `level_dims` ("r3d18_ml"). dim: embedding size (128). cluster: prototypes K (1000 K400, 200 UCF101).
    temperature: contrastive temperature (0.07). proto_temperature: prototype softmax temperature (0.1).
    split: first epoch of the graph loss (20 K400, 50 UCF101). graph_threshold: G_ins threshold (0.05).
    sk_eps, sk_iters: Sinkhorn (0.05, 3).
    proto_queue: logit queue length (1024). proto_queue_start: first epoch that runs Sinkhorn on the queue (10).
    freeze_prototype_epochs: epochs with frozen prototypes (1). w_mid, w_low, w_proto: 0.5, 0.3, 0.5.
    reduction: motion-excitation channel reduction (16). grad_gather: "full" or "local" (reference).
    """

    required_inputs: tuple[str, ...] = ("clip_a", "clip_b", "clip_g")

    def __init__(
        self, backbone: str | Callable[[], nn.Module] = "r3d18_ml", *, dim: int = 128, cluster: int = 1000,
        temperature: float = 0.07, proto_temperature: float = 0.1, split: int = 20, graph_threshold: float = 0.05,
        sk_eps: float = 0.05, sk_iters: int = 3, proto_queue: int = 1024, proto_queue_start: int = 10,
        freeze_prototype_epochs: int = 1,
        w_mid: float = 0.5, w_low: float = 0.3, w_proto: float = 0.5, reduction: int = 16,
        grad_gather: str = "full", backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        if grad_gather not in ("full", "local"):
            raise ValueError(f"grad_gather must be 'full' or 'local', got {grad_gather!r}")
        self.temperature, self.proto_temperature = temperature, proto_temperature
        self.split, self.graph_threshold = split, graph_threshold
        self.sk_eps, self.sk_iters, self.proto_queue_start = sk_eps, sk_iters, proto_queue_start
        self.freeze_prototype_epochs, self.grad_gather = freeze_prototype_epochs, grad_gather
        self.level_weights = {"high": 1.0, "mid": w_mid, "low": w_low}
        self.w_proto = w_proto
        self.epoch = 0
        self.encoder_q = resolve_backbone(backbone, **(backbone_kwargs or {}))
        if not hasattr(self.encoder_q, "forward_levels"):
            raise ValueError("the multi-level objective needs a backbone with forward_levels (layer2/3/4 maps), "
                             "e.g. 'r3d18_ml'")
        c_low, c_mid, c_high = self.encoder_q.level_dims
        self.me_low = MotionExcitation(c_low, reduction)
        self.me_mid = MotionExcitation(c_mid, reduction)
        channels = {"high": c_high, "mid": c_mid, "low": c_low}
        # per level: contrast head (instance at high, motion at mid/low), local-global head, graph head
        self.contrast_heads = nn.ModuleDict({k: Projector(c, dim) for k, c in channels.items()})
        self.lg_heads = nn.ModuleDict({k: Projector(c, dim) for k, c in channels.items()})
        self.graph_heads = nn.ModuleDict({k: Projector(c, dim) for k, c in channels.items()})
        self.global_head = nn.Sequential(nn.Linear(c_high, c_high), nn.BatchNorm1d(c_high), nn.ReLU(inplace=True),
                                         nn.Linear(c_high, dim))
        self.prototypes = nn.Linear(dim, cluster, bias=False)
        self.register_buffer("proto_queue", torch.randn(proto_queue, 2, cluster))  # Q x (A, B) x K logits

    # --- epoch-dependent state --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Call before the first step of every epoch (and after resuming): it switches the graph loss on at
        `split`, Sinkhorn to the queue at `proto_queue_start`, and decides `frozen_parameters()`."""
        self.epoch = int(epoch)

    @property
    def graph_on(self) -> bool:
        return self.epoch >= self.split

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not be updated this epoch: the prototypes in epoch < freeze_prototype_epochs,
        the graph heads before `split`."""
        frozen = list(self.prototypes.parameters()) if self.epoch < self.freeze_prototype_epochs else []
        if not self.graph_on:
            frozen += list(self.graph_heads.parameters())
        return frozen

    def after_backward(self) -> None:
        self.drop_frozen_grads()

    def drop_frozen_grads(self) -> None:
        """After backward, before optimizer.step(): .grad = None for frozen_parameters() (optimizers skip them)."""
        for p in self.frozen_parameters():
            p.grad = None

    def term_weights(self) -> dict[str, float]:
        """Weight of every logged loss term in out["loss"] at the current epoch."""
        w = {"loss_inst": 1.0, "loss_proto": self.w_proto}
        for lvl in LEVELS:
            w[f"loss_lg_{lvl}"] = self.level_weights[lvl]
        for lvl in ("mid", "low"):
            w[f"loss_motion_{lvl}"] = self.level_weights[lvl]
        for lvl in LEVELS:
            w[f"loss_graph_{lvl}"] = self.level_weights[lvl] if self.graph_on else 0.0
        return w

    @torch.no_grad()
    def normalise_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    # --- features ---------------------------------------------------------------------------------
    def levels(self, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Space-pooled per-step features, rows [A; B; G] (+ the same reversed in time for mid/low):
        high [3B, S4, C4], mid [6B, S3, C3], low [6B, S2, C2]."""
        low, mid, high = self.encoder_q.forward_levels(torch.cat([a, b, g]))  # 3B x C x S x H x W each
        low = self.me_low(time_reversed_batch(low)).mean(dim=(3, 4))  # 6B x C2 x S2
        mid = self.me_mid(time_reversed_batch(mid)).mean(dim=(3, 4))  # 6B x C3 x S3
        high = high.mean(dim=(3, 4))  # 3B x C4 x S4
        return {"high": high.transpose(1, 2), "mid": mid.transpose(1, 2), "low": low.transpose(1, 2)}

    # --- the step ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch["clip_a"|"clip_b"|"clip_g"]: [B, 3, T, S, S]. Returns "loss", the terms of term_weights()
        (unweighted), and metrics: acc_inst, acc_lg_<level>, acc_motion_<mid|low>, clusters (distinct
        pseudo-labels in the global batch), graph_on, graph_degree (mean non-zeros per row of G)."""
        if self.training:
            self.normalise_prototypes()
        B = batch["clip_a"].shape[0]
        feats = self.levels(batch["clip_a"], batch["clip_b"], batch["clip_g"])
        out: dict[str, torch.Tensor] = {}

        # Instance contrast (high) and the contrast heads' embeddings.
        high = feats["high"]  # 3B x S4 x C4
        z = self.contrast_heads["high"].mlp(high).mean(dim=1).view(3, B, -1)[:2].transpose(0, 1)  # B x 2 x D
        z_all, offset = gather(z, self.grad_gather)  # N x 2 x D
        logits = instance_logits(z, z_all, offset, self.temperature)  # 2B x (1 + 2(N-1))
        out["loss_inst"], out["acc_inst"] = info_nce(logits), top1(logits)

        # Motion contrast (mid, low): forward clips A, B vs other videos and the own reversed clips.
        for lvl in ("mid", "low"):
            m = self.contrast_heads[lvl].mlp(feats[lvl]).mean(dim=1).view(2, 3, B, -1)[:, :2]  # 2 x 2 x B x D
            f, f_rev = m[0].transpose(0, 1), m[1].transpose(0, 1)  # B x 2 x D each (forward, reversed)
            f_all, _ = gather(f, self.grad_gather)  # N x 2 x D
            logits = motion_logits(f, f_rev, f_all, offset, self.temperature)  # 2B x (1 + 2(N-1) + 2)
            out[f"loss_motion_{lvl}"], out[f"acc_motion_{lvl}"] = info_nce(logits), top1(logits)

        # Local-to-global timestamp retrieval (all levels, forward clips).
        for lvl in LEVELS:
            x = self.lg_heads[lvl].mlp(feats[lvl][:3 * B])  # 3B x S x D
            out[f"loss_lg_{lvl}"], out[f"acc_lg_{lvl}"] = local_global_loss(
                x.view(3, B, *x.shape[1:]).transpose(0, 1), self.temperature)

        # Prototypes: global head over A, B and G (its BN sees all three), logits of A and B.
        e = F.normalize(self.global_head(high.mean(dim=1)), dim=1)  # 3B x D
        proto_logits = self.prototypes(e).view(3, B, -1)[:2].transpose(0, 1)  # B x 2 x K
        codes = self.assign(proto_logits)  # N x 2 x K, no grad
        out["loss_proto"] = proto_loss(proto_logits, codes[offset:offset + B], self.proto_temperature)

        # Graph constraint: target from the gathered instance graph and the pseudo-labels, no gradient.
        with torch.no_grad():
            labels = (codes[:, 0] + codes[:, 1]).argmax(dim=1)  # N
            G = graph_target(instance_graph(z_all.detach(), self.temperature), labels, self.graph_threshold)  # N x N
        for lvl in LEVELS:
            y = self.graph_heads[lvl].mlp(feats[lvl][:3 * B]).mean(dim=1).view(3, B, -1)  # 3 x B x D (A, B, G)
            yb_all, _ = gather(y[1], self.grad_gather)  # N x D
            out[f"loss_graph_{lvl}"] = graph_loss(y[0], yb_all, G[offset:offset + B], self.temperature)

        weights = self.term_weights()
        out["loss"] = sum(w * out[k] for k, w in weights.items())
        out["clusters"] = (torch.bincount(labels, minlength=codes.shape[-1]) > 0).sum().float()
        out["graph_on"] = torch.tensor(float(self.graph_on), device=labels.device)
        out["graph_degree"] = (G > 0).float().sum(dim=1).mean()
        return out

    @torch.no_grad()
    def assign(self, proto_logits: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes [N, 2, K] of the gathered batch (from epoch `proto_queue_start` computed over the queue,
        whose last N rows are this batch); in training mode the queue takes the batch's logits."""
        logits_all = concat_all_gather(proto_logits.detach().float().contiguous())  # N x 2 x K
        N, Q = logits_all.shape[0], self.proto_queue.shape[0]
        queue = torch.cat([self.proto_queue[N:], logits_all[max(N - Q, 0):]])  # Q x 2 x K (newest last)
        if self.training:
            self.proto_queue.copy_(queue)
        scores = queue if (self.epoch >= self.proto_queue_start and Q > N) else logits_all  # M x 2 x K
        return torch.stack([sinkhorn(scores[:, c], self.sk_eps, self.sk_iters)[-N:] for c in range(2)], dim=1)
