"""MoCo for video (He et al., CVPR 2020, https://arxiv.org/abs/1911.05722), as the FAME/FIMA baseline.

Query encoder = backbone + projector (global average pool -> C -> C -> 128), L2-normalised; the key
encoder is an EMA copy (no gradient). The two clips m, n of a video are each other's positive:
L = 1/2 [CE(q_m . k_n) + CE(q_n . k_m)] over [positive, queue] logits with temperature tau (`temperature`).

Per training step, inside forward (as the reference does): one EMA update of the key encoder before
any key forward (`momentum_update`), key forwards with shuffle-BN across ranks, and after the logits the
keys are enqueued (k_n, then k_m). EMA and queue updates happen only in training mode, so an eval-mode
forward leaves the state unchanged.
`bn_groups=G > 1` emulates shuffle-BN on one process, as MoCo's single-GPU demo does ("split BN"): in
training mode the query encoder runs on G consecutive sub-batches and the key encoder on G sub-batches of a
randomly permuted batch, so BatchNorm statistics come from sub-batches and a query and its positive key are
normalised with different samples (MoCo section 3.3: otherwise the positive can be told from the queue by the
batch statistics it shares with its query). With several processes shuffle-BN is real and G stays 1.
`batch_negatives=True` adds the other videos' keys of the same step to each query's negatives (as SimCLR and MoCo
v3 do). Not in the reference. Why it exists: with a queue alone, a representation that collapses to one point
which drifts from step to step still finds its positive, the only key as fresh as itself (measured at CPU
scale, Adam 1e-3, EMA 0.99: frozen embeddings of different videos ended at cosine 0.95 while the training-time
instance accuracy read 0.3-0.7). Fresh negatives sit at the same point, so within the batch that shortcut
fails; against a long queue of stale keys it still pays (README, Status). Off by default (the papers' recipe).
`self_negative_bug=True` reproduces the reference: the n -> m logits are formed after k_n was
enqueued, so q_n meets its own key as a negative. Default False: both directions see the queue as it
was before the step.
For the trainer: wrap in DDP with broadcast_buffers=False (the queues are identical on every rank
already, and the key encoder's BN statistics are not used), and compile the backbones rather than the
objective (its forward mutates queues and runs Python loops).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import resolve_backbone
from .distributed import batch_shuffle, batch_unshuffle, concat_all_gather, rank
from .heads import Projector
from .infonce import fp32, info_nce, info_nce_logits, top1
from .objective import Objective
from .queue import KeyQueue


class MoCo(Objective):
    """backbone: registry name ("i3d", "r3d18", "r2plus1d18") or a zero-argument constructor.
    dim: embedding size (128). queue_size: queue length (65,536 for K400). momentum_ema: the key encoder's EMA
    momentum (0.999). temperature: softmax temperature (0.1). backbone_kwargs: passed to the named builder.
    """

    required_inputs: tuple[str, ...] = ("rgb_m", "rgb_n")

    def __init__(
        self, backbone: str | Callable[[], nn.Module] = "i3d", *, dim: int = 128, queue_size: int = 65536,
        momentum_ema: float = 0.999, temperature: float = 0.1, self_negative_bug: bool = False, bn_groups: int = 1,
        batch_negatives: bool = False, backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        self.momentum_ema, self.temperature = momentum_ema, temperature
        self.self_negative_bug, self.batch_negatives = self_negative_bug, batch_negatives
        if bn_groups < 1:
            raise ValueError(f"bn_groups must be at least 1, got {bn_groups}")
        self.bn_groups = bn_groups
        self.encoder_q = resolve_backbone(backbone, **(backbone_kwargs or {}))
        self.projector_q = Projector(self.encoder_q.feature_dim, dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.projector_k = copy.deepcopy(self.projector_q)
        for p in self._key_params():
            p.requires_grad_(False)
        self.queue = KeyQueue(queue_size, dim)

    def run_warnings(self, *, global_batch: int, steps_per_epoch: int, total_steps: int, num_videos: int) -> list[str]:
        """Queue and EMA settings against the run's length (config keys queue_size and momentum_ema)."""
        warnings = []
        # the queue takes 2 keys per video per step; one that outlives an epoch holds each video's own earlier
        # keys as negatives (on a small dataset that stalls the instance task)
        span = self.queue.K / (2 * global_batch)
        if span >= steps_per_epoch:
            fit = max(2 * global_batch, 2 * global_batch * (steps_per_epoch // 8))
            warnings.append(f"queue_size {self.queue.K} holds the keys of the last {span:.0f} steps, more than an "
                            f"epoch ({steps_per_epoch} steps of {num_videos} videos): every video's own earlier keys "
                            f"are among its negatives. The UCF101 recipe's queue spans ~1/8 of an epoch (2240 keys, "
                            f"9537 videos); consider queue_size={fit}")
        kept = self.momentum_ema ** total_steps   # share of the key encoder's initial weights left at the end
        if kept > 0.5:
            warnings.append(f"with momentum_ema {self.momentum_ema} over {total_steps} steps the key encoder keeps "
                            f"{kept:.0%} of its random initial weights; a short run wants a lower momentum (e.g. "
                            f"momentum_ema={max(0.0, min(0.99, 1 - 5 / total_steps)):.3g})")
        return warnings

    # --- momentum encoder -------------------------------------------------------------------------
    def _query_params(self):
        return [*self.encoder_q.parameters(), *self.projector_q.parameters()]

    def _key_params(self):
        return [*self.encoder_k.parameters(), *self.projector_k.parameters()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (m = momentum_ema) for backbone and projector (BN buffers are not
        averaged)."""
        for pk, pq in zip(self._key_params(), self._query_params()):
            pk.lerp_(pq.detach(), 1.0 - self.momentum_ema)

    @torch.no_grad()
    def key_forward(self, x: torch.Tensor, head: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]):
        """Key encoder on x [B, 3, T, H, W] with shuffle-BN; `head` maps the feature map to per-sample
        outputs (computed on the shuffled batch), which are returned in the original order."""
        x, idx_unshuffle = batch_shuffle(x)
        if self._groups(x.shape[0]) > 1:   # one-process shuffle-BN: sub-batches of a permuted batch
            perm = torch.randperm(x.shape[0], device=x.device)  # B
            outs = head(self._grouped(self.encoder_k, x[perm]))
            outs = tuple(o[torch.argsort(perm)] for o in outs)
        else:
            outs = head(self.encoder_k(x))
        return tuple(batch_unshuffle(o, idx_unshuffle) for o in outs)

    def _groups(self, batch: int) -> int:
        """BatchNorm sub-batches for a batch of this size: bn_groups in training mode, fewer when the batch is too
        small for two samples per group (a memory probe, a last partial batch), 1 in eval mode."""
        return min(self.bn_groups, batch // 2) if self.training else 1

    def _grouped(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """encoder on the `_groups` consecutive sub-batches of x (BatchNorm statistics per sub-batch), concatenated."""
        groups = self._groups(x.shape[0])
        if groups <= 1:
            return encoder(x)
        return torch.cat([encoder(c) for c in x.chunk(groups)])

    def _embed_k(self, fmap: torch.Tensor) -> tuple[torch.Tensor]:
        return (F.normalize(self.projector_k(fmap.mean(dim=(2, 3, 4))), dim=1),)  # B x dim

    def encode_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query encoder: x [B, 3, T, H, W] -> (feature map [B, C, T', H', W'], q [B, dim] unit)."""
        fmap = self._grouped(self.encoder_q, x)  # B x C x T' x H' x W'
        q = F.normalize(self.projector_q(fmap.mean(dim=(2, 3, 4))), dim=1)  # B x dim
        return fmap, q

    # --- instance loss ----------------------------------------------------------------------------
    def instance_loss(self, q_m, q_n, k_m, k_n, skip_mn=None, skip_nm=None) -> dict[str, torch.Tensor]:
        """Symmetric cross-clip MoCo loss; enqueues k_n then k_m (in training mode). skip_mn / skip_nm [B]: with
        batch_negatives, the one in-batch key (local index) that is not a negative of q_m[i] / q_n[i] (FAME)."""
        queue = self.queue.snapshot()  # K x dim
        tau = self.temperature
        logits_mn = self._with_batch(info_nce_logits(q_m, k_n, queue, tau), q_m, k_n, skip_mn)  # B x (1+K[+B-1])
        if self.training:
            self.queue.enqueue(k_n)
            if self.self_negative_bug:
                queue = self.queue.snapshot()  # now holds k_n: q_n meets its own key
        logits_nm = self._with_batch(info_nce_logits(q_n, k_m, queue, tau), q_n, k_m, skip_nm)  # B x (1+K[+B-1])
        if self.training:
            self.queue.enqueue(k_m)
        loss = 0.5 * (info_nce(logits_mn) + info_nce(logits_nm))
        return {"loss_inst": loss, "acc_inst": 0.5 * (top1(logits_mn) + top1(logits_nm))}

    def _with_batch(self, logits: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    skip: torch.Tensor | None = None) -> torch.Tensor:
        """With batch_negatives: append q_i . k_j / tau for the other videos j != i of this step (gathered over ranks,
        so every rank sees the global batch) to the [positive, queue] logits; skip [B] (local key indices) drops
        one more column per row."""
        if not self.batch_negatives:
            return logits
        k_all = concat_all_gather(k)  # (W*B) x dim, rank order
        B, off = q.shape[0], rank() * q.shape[0]
        with fp32(q.device):
            l_batch = q.float() @ k_all.float().T / self.temperature  # B x W*B
            own = torch.arange(B, device=q.device) + off
            l_batch[torch.arange(B, device=q.device), own] = float("-inf")  # the positive is already column 0
            if skip is not None:
                l_batch[torch.arange(B, device=q.device), skip + off] = float("-inf")
            return torch.cat([logits, l_batch], dim=1)

    def moco_forward(self, x_m: torch.Tensor, x_n: torch.Tensor, **skips) -> dict[str, torch.Tensor]:
        if self.training:
            self.momentum_update()
        (k_m,) = self.key_forward(x_m, self._embed_k)  # B x dim
        (k_n,) = self.key_forward(x_n, self._embed_k)  # B x dim
        _, q_m = self.encode_q(x_m)  # B x dim
        _, q_n = self.encode_q(x_n)  # B x dim
        out = self.instance_loss(q_m, q_n, k_m, k_n, **skips)
        return {"loss": out["loss_inst"], **out}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch["rgb_m"], batch["rgb_n"]: [B, 3, T, H, W] normalised clips of two windows of each video.
        Returns {"loss", "loss_inst", "acc_inst"}."""
        return self.moco_forward(batch["rgb_m"], batch["rgb_n"])
