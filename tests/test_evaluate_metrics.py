"""evaluate/: the metric functions against hand-made score matrices, the presets, the guards (no video needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluate import average_per_video, cosine_similarity_matrix, recall_at_k, topk_accuracy, video_features
from evaluate.linear import train_probe
from evaluate.protocols import resolve


def test_topk_accuracy_on_a_hand_made_matrix():
    scores = [[0.1, 0.5, 0.2, 0.15, 0.05],    # truth 1: rank 0          -> top-1 hit
              [0.3, 0.1, 0.4, 0.1, 0.1],      # truth 0: rank 1 (0.4)    -> top-2 hit
              [0.2, 0.2, 0.1, 0.3, 0.2],      # truth 2: rank 4 (last)   -> only top-5
              [0.0, 0.0, 0.0, 0.0, 1.0]]      # truth 4: rank 0          -> top-1 hit
    labels = [1, 0, 2, 4]
    assert topk_accuracy(scores, labels, (1, 2, 3, 5, 9)) == {1: 0.5, 2: 0.75, 3: 0.75, 5: 1.0, 9: 1.0}
    # ties count for the true class: three classes share the best score, none is strictly better
    assert topk_accuracy([[1.0, 1.0, 1.0, 0.0]], [2], (1,)) == {1: 1.0}
    with pytest.raises(ValueError, match="labels outside"):
        topk_accuracy(scores, [1, 0, 2, 5])


def test_per_video_averaging_over_ten_clips_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    n_videos, clips, classes = 4, 10, 6
    logits = rng.normal(size=(n_videos * clips, classes)) * 3
    index = np.repeat(np.arange(n_videos), clips)
    labels = rng.integers(0, classes, n_videos)[index]
    perm = rng.permutation(len(index))                        # clips arrive in any order, across ranks
    pad = np.zeros((3, classes))                              # padding units of the last batch: index -1
    scores_in = np.concatenate([logits[perm], pad])
    index_in = np.concatenate([index[perm], [-1, -1, -1]])
    labels_in = np.concatenate([labels[perm], [-1, -1, -1]])
    videos, soft, vlabels = average_per_video(scores_in, index_in, "softmax", labels_in)
    _, mean_logits = average_per_video(scores_in, index_in, "logits")
    assert videos.tolist() == list(range(n_videos)) and vlabels.tolist() == labels[::clips].tolist()
    for v in range(n_videos):                                 # the same numbers, the long way round
        rows = logits[v * clips:(v + 1) * clips]
        probs = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in rows]
        want = [sum(p[k] for p in probs) / clips for k in range(classes)]
        assert np.allclose(soft[v].numpy(), want, atol=1e-12)
        assert np.allclose(mean_logits[v].numpy(), rows.mean(0), atol=1e-12)


def test_softmax_and_logit_averaging_can_disagree():
    """Two clips of one video: one very sure of class 0, one fairly sure of class 1 -- the two averages differ."""
    clips = [[10.0, 0.0, 0.0], [-9.0, 2.0, 0.0]]
    _, soft = average_per_video(clips, [0, 0], "softmax")
    _, logit = average_per_video(clips, [0, 0], "logits")
    assert torch.allclose(logit, torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64))
    assert logit.argmax().item() == 1         # mean logits favour class 1
    assert soft.argmax().item() == 0          # mean probabilities: ~(0.5, 0.44, 0.06)
    assert math.isclose(soft.sum().item(), 1.0)


def test_recall_at_k_on_a_hand_made_similarity_matrix():
    gallery_labels = [0, 1, 2, 0, 1]
    query_labels = [0, 1, 2]
    sim = [[0.9, 0.8, 0.1, 0.2, 0.0],      # q0 (class 0): best is g0 (class 0)                      -> hit at 1
           [0.7, 0.2, 0.9, 0.1, 0.3],      # q1 (class 1): g2(2) g0(0) g4(1)                          -> hit at 3
           [0.5, 0.4, 0.0, 0.3, 0.2]]      # q2 (class 2): its only same-class item g2 ranks last      -> hit at 5
    assert recall_at_k(sim, query_labels, gallery_labels, (1, 2, 3, 4, 5, 50)) == {
        1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 4: 2 / 3, 5: 1.0, 50: 1.0}
    # equal similarities: the earlier gallery item ranks first (stable), so the result never depends on sorting
    assert recall_at_k([[0.5, 0.5]], [1], [0, 1], (1, 2)) == {1: 0.0, 2: 1.0}
    with pytest.raises(ValueError):
        recall_at_k(sim, query_labels, gallery_labels[:4])


def test_video_features_and_cosine_similarity():
    feats = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [5.0, 0.0]])
    videos, vf, labels = video_features(feats, [0, 0, 1, 1], [7, 7, 8, 8])
    # video 0: mean of (0.6, 0.8) and (0, 1); video 1: mean of (1, 0) and (1, 0)
    assert videos.tolist() == [0, 1] and labels.tolist() == [7, 8]
    assert torch.allclose(vf, torch.tensor([[0.3, 0.9], [1.0, 0.0]], dtype=torch.float64))
    sim = cosine_similarity_matrix(vf, vf)
    assert torch.allclose(sim.diagonal(), torch.ones(2, dtype=torch.float64))
    assert math.isclose(sim[0, 1].item(), 0.3 / math.hypot(0.3, 0.9))
    q, g = torch.tensor([[1.0, 1.0], [3.0, 1.0]]), torch.tensor([[0.0, 5.0], [2.0, 5.0]])
    assert math.isclose(cosine_similarity_matrix(q, g)[0, 0].item(), 1 / math.sqrt(2))
    # centred (CoCLR/FAME): q -> (-1, 0), (1, 0); g -> (-1, 0), (1, 0)
    assert torch.allclose(cosine_similarity_matrix(q, g, center=True),
                          torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))


def test_presets_and_overrides():
    pre = {"frames": 16, "stride": 2, "crop": 112, "backbone": "r3d18"}
    ucf = resolve("finetune", "fima", {}, pre, "r3d18", "ucf101")
    assert (ucf["lr"], ucf["batch_size"], ucf["epochs"], ucf["milestones"], ucf["dropout"], ucf["crop"]) == \
        (0.01, 16, 150, "60,120", 0.7, 112)
    assert resolve("finetune", "fima", {}, pre, "r3d18", "hmdb51")["dropout"] == 0.5
    coclr = resolve("finetune", "coclr", {"epochs": 2}, pre, "r3d18", "ucf101")
    assert (coclr["optimizer"], coclr["backbone_lr_mult"], coclr["dropout"], coclr["frames"], coclr["stride"],
            coclr["epochs"]) == ("adam", 0.1, 0.9, 32, 1, 2)
    assert resolve("linear", "fima", {"crop": 48}, None, "i3d")["crop"] == 48
    assert resolve("linear", "fima", {}, None, "i3d")["crop"] == 224            # random init: the backbone's usual
    with pytest.raises(ValueError, match="does not apply"):
        resolve("retrieval", "fima", {"epochs": 3}, pre, "r3d18")
    with pytest.raises(ValueError, match="test-crops"):
        resolve("linear", "fima", {"test_crops": 2}, pre, "r3d18")


def test_linear_probe_trains_only_the_linear_layer_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 16, generator=g)
    labels = torch.arange(60) % 3
    feats[torch.arange(60), labels] += 3.0                       # separable
    s = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "epochs": 30, "milestones": "20", "lr_decay": 0.1,
         "probe_batch": 16}
    a, b = train_probe(feats, labels, 3, s, seed=1), train_probe(feats, labels, 3, s, seed=1)
    assert [n for n, p in a.named_parameters()] == ["fc.weight", "fc.bias"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (a(feats).argmax(1) == labels).float().mean() > 0.9


def test_knn_scores_on_a_hand_made_gallery():
    """Weighted kNN: the k most cosine-similar gallery items vote with weight exp(cos / T), recomputed by hand."""
    from evaluate.metrics import knn_scores
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    query = torch.tensor([[2.0, 0.0]])                       # unit [1, 0]: cosines 1, 0.8, 0, -1, 0.6
    s = knn_scores(query, gallery, labels, 3, k=3, T=0.5)
    assert s.shape == (1, 3)
    assert s[0].tolist() == pytest.approx([math.exp(1 / 0.5), math.exp(0.8 / 0.5), math.exp(0.6 / 0.5)])
    # k=1: the nearest decides; a large k with a small T still lets the nearest neighbours dominate
    assert knn_scores(query, gallery, labels, 3, k=1).argmax(1).tolist() == [0]
    assert knn_scores(query, gallery, labels, 3, k=5, T=0.01).argmax(1).tolist() == [0]
    with pytest.raises(ValueError, match="labels"):
        knn_scores(query, gallery, labels[:3], 3)


def test_static_feature_is_the_middle_frame_repeated():
    """evaluate.features.pooled "pooled-static" against the clip built by hand: frame T//2 at every time step."""
    from evaluate.features import pooled
    from model import build_backbone

    torch.manual_seed(0)
    net = build_backbone("i3d", width=0.125).eval()
    video = torch.rand(2, 3, 8, 32, 32)
    by_hand = torch.stack([video[:, :, 4]] * 8, dim=2)   # B x 3 x T x S x S
    with torch.no_grad():
        got = pooled(net, "pooled-static")(video)
        want = net(by_hand).mean(dim=(2, 3, 4))
        moving = pooled(net, "pooled")(video)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, moving)
