"""FIMA: fine-grained motion alignment between RGB clips and frame differences (ACM MM 2023,
https://arxiv.org/abs/2309.00297), written from the reading in notes/fima-reference.md.

L = L_inst + lambda_dense * L_dense + L_local.
* L_inst: MoCo between the RGB globals of windows m and n (see moco.py, incl. `self_negative_bug`).
* Key encoder (EMA of backbone + projector, shuffle-BN) encodes the two RGB globals (-> k, foreground
  score), the two diff globals (-> per-token unit features Z [B, T', N, D] + foreground score) and the
  four diff locals (-> pooled unit features u). The query encoder only sees RGB.
* Motion decoder (fima_decoder.py): for (a, b) in ((m, n), (n, m)) and slice t: target = [cls; tokens of a
  at t], memory = tokens of b at t -> E2 -> shared query projector per token -> unit vectors. The cls
  output predicts b's local motion feature u_b^t (L_local against the other three locals of the batch
  and a motion queue); the token outputs predict b's diff map at slice t on a's crop grid (L_dense,
  positives by crop geometry and the foreground mask, negatives every cell of both slices of every clip
  in the batch plus an optional dense queue).
* dense_coords="normalized" (reference, default) measures cell distances in per-axis normalised source
  coordinates; "pixel" in source pixels, which needs batch["frame_hw"] [B, 2] (per-sample, since videos'
  aspect ratios differ; the pipeline always provides it).
Per step inside forward (training mode): EMA update first, then keys, losses, and enqueues (instance:
k_n, k_m; motion: [u_n1; u_n2; u_m1; u_m2]; dense: Z_n^0, Z_n^1, Z_m^0, Z_m^1).
The backbone must give T' = 2 slices (one per local clip), e.g. I3D on 16 frames.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fima_decoder import MotionDecoder
from .fima_losses import dense_loss, dense_positive_pairs, foreground_mask, foreground_score, local_loss
from .moco import MoCo
from .queue import KeyQueue


class FIMA(MoCo):
    """Hyper-parameters as in the reference: queue_size, the instance and motion queues' length (65,536 K400, 2,240
    UCF101), dense_queue_size (0 = none, as for UCF101; 31,360 for K400), momentum_ema 0.999, temperature 0.1,
    dense_temperature 0.1, dense_weight 1, pos_ratio 0.7, decoder d_model 512, 4 heads, FFN 512, 2 layers, dropout 0.1.
    """

    required_inputs: tuple[str, ...] = (
        "rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2", "box_m", "box_n",
    )

    def __init__(
        self, backbone: str | Callable[[], nn.Module] = "i3d", *, dim: int = 128, queue_size: int = 65536,
        dense_queue_size: int = 0, momentum_ema: float = 0.999, temperature: float = 0.1,
        dense_temperature: float = 0.1, dense_weight: float = 1.0, pos_ratio: float = 0.7,
        dense_coords: str = "normalized", d_model: int = 512, heads: int = 4, ffn_dim: int = 512,
        decoder_layers: int = 2, dropout: float = 0.1, self_negative_bug: bool = False, bn_groups: int = 1,
        batch_negatives: bool = False, backbone_kwargs: dict | None = None,
    ):
        super().__init__(backbone, dim=dim, queue_size=queue_size, momentum_ema=momentum_ema, temperature=temperature,
                         self_negative_bug=self_negative_bug, bn_groups=bn_groups, batch_negatives=batch_negatives,
                         backbone_kwargs=backbone_kwargs)
        if dense_coords not in ("normalized", "pixel"):
            raise ValueError(f"dense_coords must be 'normalized' or 'pixel', got {dense_coords!r}")
        self.dense_temperature, self.dense_weight, self.pos_ratio = dense_temperature, dense_weight, pos_ratio
        self.dense_coords = dense_coords
        if dense_coords == "pixel":
            self.required_inputs = FIMA.required_inputs + ("frame_hw",)
        self.decoder = MotionDecoder(self.encoder_q.feature_dim, d_model, heads, ffn_dim, decoder_layers, dropout)
        self.motion_queue = KeyQueue(queue_size, dim)
        self.dense_queue = KeyQueue(dense_queue_size, dim)

    # --- key-encoder heads (run on the shuffled batch; every output is per sample) ----------------
    def _rgb_k(self, fmap):
        return self._embed_k(fmap)[0], foreground_score(fmap)  # B x dim, B x H' x W'

    def _diff_k(self, fmap):
        z = F.normalize(self.projector_k.mlp(fmap.flatten(3).movedim(1, -1)), dim=-1)  # B x T' x N x dim
        return z, foreground_score(fmap)  # B x T' x N x dim, B x H' x W'

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: see `required_inputs`; clips [B, 3, T, S, S], boxes [B, 4]. Returns loss, loss_inst,
        loss_dense, loss_local, acc_inst, acc_local, dense_pos_cells (query cells with a positive, per pair)."""
        if self.training:
            self.momentum_update()
        clips = ("m", "n")

        # Key branch (no grad, shuffle-BN per input).
        k, Z, mask, u = {}, {}, {}, {}
        for c in clips:
            k[c], s_rgb = self.key_forward(batch["rgb_" + c], self._rgb_k)  # B x dim, B x H' x W'
            Z[c], s_diff = self.key_forward(batch["diff_" + c], self._diff_k)  # B x T' x N x dim, B x H' x W'
            mask[c] = foreground_mask(s_rgb + s_diff)  # B x H' x W' bool
            u[c] = [self.key_forward(batch[f"diff_{c}{i}"], self._embed_k)[0] for i in (1, 2)]  # 2 x [B x dim]

        # Query branch.
        q, tok = {}, {}
        for c in clips:
            fmap, q[c] = self.encode_q(batch["rgb_" + c])  # B x C x T' x H' x W', B x dim
            tok[c] = self.decoder.tokens(fmap)  # B x T' x N x d
        B, Tp, N, _ = tok["m"].shape
        grid_hw = tuple(fmap.shape[-2:])
        if Tp != 2:
            raise ValueError(f"FIMA needs T' = 2 feature slices (one per local clip); the backbone gave {Tp}")

        out = self.instance_loss(q["m"], q["n"], k["m"], k["n"])

        # Motion decoder, all (b, t) passes in one batch: rows ordered (clip b, slice t, sample).
        other = {"m": "n", "n": "m"}  # a = other[b]: the target clip, on whose crop grid b is predicted
        target = torch.cat([tok[other[b]][:, t] for b in clips for t in range(Tp)])  # (2*Tp*B) x N x d
        memory = torch.cat([tok[b][:, t] for b in clips for t in range(Tp)])  # (2*Tp*B) x N x d
        pred = F.normalize(self.projector_q.mlp(self.decoder(target, memory)), dim=-1)  # (2*Tp*B) x 1+N x dim
        pred = pred.reshape(2, Tp, B, 1 + N, -1)  # b x t x B x 1+N x dim

        # L_local: the cls output for (b, t) predicts the key feature of b's diff-local clip t.
        u_all = torch.stack([torch.stack(u[c]) for c in clips])  # 2 x 2 x B x dim
        loss_local, acc_local = local_loss(pred[:, :, :, 0], u_all, self.motion_queue.snapshot(), self.temperature)

        # L_dense: the token outputs for (b, t) predict b's diff map at slice t on a's crop grid.
        frame_hw = batch["frame_hw"] if self.dense_coords == "pixel" else None
        dense_queue = self.dense_queue.snapshot()  # K_d x dim
        dense_terms, pos_cells = [], []
        for j, b in enumerate(clips):
            a = other[b]
            A = dense_positive_pairs(batch["box_" + a], batch["box_" + b], grid_hw, mask[a], mask[b],
                                     self.pos_ratio, frame_hw)  # B x N x N
            for t in range(Tp):
                loss_t, n_pos = dense_loss(pred[j, t, :, 1:], Z[b], t, A, self.dense_temperature, dense_queue)
                dense_terms.append(loss_t)
                pos_cells.append(n_pos)
        loss_dense = sum(dense_terms) / len(dense_terms)

        if self.training:
            self.motion_queue.enqueue(torch.cat([u["n"][0], u["n"][1], u["m"][0], u["m"][1]]))  # 4B x dim
            for c in ("n", "m"):
                for t in range(Tp):
                    self.dense_queue.enqueue(Z[c][:, t].reshape(-1, Z[c].shape[-1]))  # (B*N) x dim

        loss = out["loss_inst"] + self.dense_weight * loss_dense + loss_local
        return {
            "loss": loss, "loss_inst": out["loss_inst"], "loss_dense": loss_dense, "loss_local": loss_local,
            "acc_inst": out["acc_inst"], "acc_local": acc_local,
            "dense_pos_cells": (sum(pos_cells).float() / (len(pos_cells) * B * N)).detach(),
        }
