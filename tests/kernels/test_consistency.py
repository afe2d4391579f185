"""Consistency maths: similarity matrices, pair statistics, CLIPScore, masks, preprocessing (no host)."""
from __future__ import annotations

import pytest
import torch

from storykit.kernels import consistency as cons


def test_cosine_matrix_is_symmetric_with_unit_diagonal_and_follows_a_permutation():
    f = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    m = cons.cosine_matrix(f)
    assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(6), atol=1e-6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(cons.cosine_matrix(f[perm]), m[perm][:, perm], atol=1e-6)
    assert torch.allclose(cons.cosine_matrix(f * 7.0), m, atol=1e-6)  # scale-free


def test_pair_values_take_each_unordered_pair_once_and_skip_invalid_frames():
    m = torch.arange(16, dtype=torch.float32).view(4, 4)
    assert cons.pair_values(m) == [1, 2, 3, 6, 7, 11]
    assert cons.pair_values(m, [True, False, True, True]) == [2, 3, 11]


def test_summary_of_nothing_is_empty_not_a_division_by_zero():
    assert cons.summary([]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    s = cons.summary([0.5, 1.0])
    assert s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(0.25) and s["n"] == 2
    assert cons.aggregate([0.2, None, 0.4])["mean"] == pytest.approx(0.3)


def test_clip_score_is_two_and_a_half_times_the_clamped_cosine():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.2]])
    assert torch.allclose(cons.clip_score(img, txt), torch.tensor([2.5, 2.5 / 2 ** 0.5, 0.0]), atol=1e-6)


def test_masks_fill_the_background_and_are_resized_to_the_frame():
    images = torch.rand(2, 8, 8, 3)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1.0
    out = cons.apply_masks(images, mask, fill=0.25)
    assert torch.allclose(out[:, :3], images[:, :3], atol=1e-6)
    assert torch.allclose(out[:, 5:], torch.full_like(out[:, 5:], 0.25))
    with pytest.raises(ValueError, match="one mask per frame"):
        cons.apply_masks(images, torch.ones(3, 8, 8))


def test_preprocess_crops_the_centre_or_resizes_whole():
    img = torch.zeros(1, 100, 200, 3)
    img[:, :, 50:150] = 1.0  # the centre square is white, the sides black
    x = cons.preprocess(img, 32, (0, 0, 0), (1, 1, 1), crop=True)
    assert x.shape == (1, 3, 32, 32) and x[..., 2:-2].min() > 0.99
    y = cons.preprocess(img, 32, (0, 0, 0), (1, 1, 1), crop=False)
    assert y.shape == (1, 3, 32, 32) and y[..., 0].max() < 0.01
