"""FAME merge (mask size, merge rule, static clips, hue switch) and the clip colour augmentation."""

import math

import torch

from model import KINETICS_MEAN, KINETICS_STD, ColourAugment
from model.fame_augment import adjust_hue, blur_kernel_size
from model.fame import colour_bins, fame_foreground_mask, fame_merge


def moving_square_clip(B=2, T=8, S=48):
    """Static striped blue background, a red square moving right by 2 px per frame."""
    x = torch.zeros(B, 3, T, S, S)
    x[:, 2] = 0.6
    x[:, 1, :, ::4] = 0.3  # stripes (texture, no motion)
    for t in range(T):
        x[:, :, t, 16:28, 4 + 2 * t : 16 + 2 * t] = torch.tensor([0.9, 0.1, 0.1])[None, :, None, None]
    return x


def test_mask_has_exactly_floor_beta_s2_pixels():
    torch.manual_seed(0)
    for S, beta in ((32, 0.5), (33, 0.5), (32, 0.3)):
        x = torch.rand(3, 3, 4, S, S)
        mask = fame_foreground_mask(x, beta)
        assert mask.dtype == torch.bool and mask.shape == (3, S, S)
        assert mask.flatten(1).sum(dim=1).tolist() == [math.floor(beta * S * S)] * 3


def test_mask_finds_the_moving_object():
    x = moving_square_clip()
    mask = fame_foreground_mask(x, 0.5)
    square = torch.zeros(48, 48, dtype=torch.bool)
    square[16:28, 4:30] = True  # every pixel the square covers at some frame
    assert mask[:, square].float().mean() > 0.9


def test_static_and_single_frame_clips_do_not_crash():
    static = torch.rand(2, 3, 1, 1, 1).expand(2, 3, 6, 32, 32)  # constant colour, no motion
    for x in (static, torch.zeros(2, 3, 6, 32, 32), torch.rand(2, 3, 1, 32, 32)):
        mask = fame_foreground_mask(x.contiguous(), 0.5)
        assert mask.flatten(1).sum(dim=1).tolist() == [512, 512]


def test_merge_is_foreground_of_one_clip_on_background_of_another():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 5, 16, 16)
    mask = torch.rand(4, 16, 16) > 0.5
    perm = torch.tensor([2, 0, 3, 1])
    merged = fame_merge(x, mask, perm)
    for b in range(4):
        m = mask[b][None, None].expand(3, 5, 16, 16)  # same pixels on every channel and frame
        assert torch.equal(merged[b][m], x[b][m])
        assert torch.equal(merged[b][~m], x[perm[b]][~m])


def test_colour_bins_and_the_hue_wrap_switch():
    # Two saturated colours with hues 1 rad apart: different bins, except under the reference's
    # double conversion (angle = 2*pi*h), where 1 rad of hue is a whole turn of the wheel.
    def hsv_pixel(h):
        from kornia.color import hsv_to_rgb
        return hsv_to_rgb(torch.tensor([h, 1.0, 1.0]).view(1, 3, 1, 1))

    a, b = hsv_pixel(0.3), hsv_pixel(1.3)
    assert colour_bins(a).item() != colour_bins(b).item()
    assert colour_bins(a, hue_wrap_bug=True).item() == colour_bins(b, hue_wrap_bug=True).item()
    bins = colour_bins(torch.rand(2, 3, 20, 20))
    assert bins.min() >= 0 and bins.max() <= 999
    # Gray pixels (s = 0) sit in the centre of the wheel: i_a = i_b = round(5.5) = 6 (half to even).
    gray = torch.full((1, 3, 1, 1), 0.5)
    assert colour_bins(gray).item() == (6 - 1) + 10 * (6 - 1) + 100 * (round(9 * 0.5 + 1) - 1)


def test_hue_switch_changes_the_mask():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 32, 32)
    assert not torch.equal(fame_foreground_mask(x, 0.5), fame_foreground_mask(x, 0.5, hue_wrap_bug=True))


def test_colour_augment_with_nothing_applied_only_normalises():
    x = torch.rand(2, 3, 4, 16, 16)
    aug = ColourAugment(p_gray=0.0, p_jitter=0.0, p_blur=0.0)
    mean, std = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(aug(x), (x - mean) / std)


def test_colour_augment_parameters_are_per_sample_and_shared_over_frames():
    torch.manual_seed(0)
    frame = torch.rand(1, 3, 1, 24, 24)
    x = frame.expand(6, 3, 5, 24, 24).contiguous(memory_format=torch.channels_last_3d)  # 6 identical static clips
    out = ColourAugment(p_gray=0.5, p_jitter=1.0, p_blur=0.5)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))  # identical frames stay identical
    assert not torch.allclose(out[0], out[1])  # but samples differ
    gray = ColourAugment(p_gray=1.0, p_jitter=0.0, p_blur=0.0)(x) * torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1)
    gray = gray + torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])  # grayscale: equal channels


def test_hue_shift_is_a_rotation():
    x = torch.rand(2, 3, 3, 8, 8) * 0.8 + 0.1
    back = adjust_hue(adjust_hue(x, torch.tensor([0.1, -0.05])), torch.tensor([-0.1, 0.05]))
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)


def test_blur_kernel_size():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(112) == 11


def test_merge_and_augment_runs_in_fp32_under_autocast():
    from model import FAME

    fame = FAME("i3d", queue_size=8, backbone_kwargs={"width": 0.125})
    x = moving_square_clip(B=3, T=4, S=32)
    torch.manual_seed(3)
    ref, _ = fame.merge_and_augment(x)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fame.merge_and_augment(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_shared_background_keys_name_the_key_with_the_querys_background():
    from model.fame import shared_background_keys

    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 2, 8, 8, generator=g)
    mask = torch.zeros(6, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True  # left half foreground, right half background
    perm = torch.randperm(6, generator=g)
    merged = fame_merge(x, mask, perm)
    skips = shared_background_keys(perm)
    for i in range(6):
        # q_m[i]'s background is clip skip_mn[i]'s right half
        assert torch.equal(merged[i, ..., 4:], x[skips["skip_mn"][i], ..., 4:])
        # the merged clip skip_nm[i] carries clip i's right half
        assert torch.equal(merged[skips["skip_nm"][i], ..., 4:], x[i, ..., 4:])


def test_instance_loss_skips_exactly_the_named_in_batch_negative():
    """MoCo.instance_loss with batch negatives and skip_mn / skip_nm against the InfoNCE written out by hand."""
    import torch.nn.functional as F
    from model import MoCo

    g = torch.Generator().manual_seed(0)
    B, D, T = 5, 128, 0.2  # D: the projector's embedding size (the empty queue has that width)
    q_m, q_n, k_m, k_n = (F.normalize(torch.randn(B, D, generator=g), dim=1) for _ in range(4))
    skip_mn, skip_nm = torch.tensor([1, 0, 3, 2, 4]), torch.tensor([2, 2, 0, 4, 1])
    moco = MoCo("i3d", queue_size=0, temperature=T, batch_negatives=True, backbone_kwargs={"width": 0.125}).eval()
    got = moco.instance_loss(q_m, q_n, k_m, k_n, skip_mn, skip_nm)["loss_inst"]

    def by_hand(q, k, skip):
        total = 0.0
        for i in range(B):
            cols = [i] + [j for j in range(B) if j != i and j != int(skip[i])]
            logits = torch.stack([q[i] @ k[j] for j in cols]) / T
            total += -torch.log_softmax(logits, dim=0)[0]
        return total / B

    want = 0.5 * (by_hand(q_m, k_n, skip_mn) + by_hand(q_n, k_m, skip_nm))
    torch.testing.assert_close(got, want)
    without = moco.instance_loss(q_m, q_n, k_m, k_n)["loss_inst"]
    assert not torch.allclose(without, want)
