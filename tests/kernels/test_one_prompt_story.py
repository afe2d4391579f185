"""One-Prompt-One-Story kernels without the host: consolidation, token sets, SVR, NPR and the IPCA bias identity."""
import math

import numpy as np
import pytest
import torch

from storykit.kernels import one_prompt_story as ops


# ---------------------------------------------------------------------------------------------- consolidation
def test_all_frames_fit_keeps_story_order_for_every_frame():
    plan = ops.consolidate(10, [5, 6, 7], window=10)
    assert [p.order for p in plan] == [(0, 1, 2)] * 3
    assert [p.express for p in plan] == [0, 1, 2]


def test_window_shrinks_in_tokens_and_wraps_around():
    # 20 + 4 frames of 20 tokens: only 2 frames fit next to P0 within 75 (20 + 40 = 60, 20 + 60 = 80)
    plan = ops.consolidate(20, [20, 20, 20, 20], window=10)
    assert [p.order for p in plan] == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert ops.max_window(20, [20, 20, 20, 20], 10) == 2


def test_window_is_counted_over_every_rotation_not_only_the_first():
    # frames 0+1 fit (10+30+30=70) but 2+0 do not (10+40+30=80) -> w = 1
    assert ops.max_window(10, [30, 30, 40], 10) == 1


def test_user_window_smaller_than_story():
    plan = ops.consolidate(3, [2] * 5, window=3)
    assert plan[4].order == (4, 0, 1) and plan[4].express == 4


def test_too_long_identity_reports_tokens_over():
    with pytest.raises(ops.StoryTooLong) as info:
        ops.consolidate(70, [3, 9, 4], window=10)
    assert info.value.frame == 1 and info.value.over == 70 + 9 - 75
    assert "4 token(s) over" in str(info.value)


def test_token_sets_positions():
    sets = ops.token_sets(3, [2, 4, 1], ops.FramePrompt((1, 2, 0), express=2))
    assert sets.identity == (0, 1, 2, 3)
    assert sets.express == (8,)             # start, P0 (1..3), frame 1 (4..7), frame 2 (8), frame 0 (9..10)
    assert sets.suppress == ((4, 5, 6, 7), (9, 10))
    assert sets.eot == tuple(range(11, 77))


# ---------------------------------------------------------------------------------------------- SVR / NPR
def numpy_reweight(e: np.ndarray, rows, a, b, sign):
    rows = sorted(set(rows))
    m = e[rows].astype(np.float64).T
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    out = e.copy()
    out[rows] = (u @ np.diag(b * s * np.exp(sign * a * s)) @ vt).T.astype(e.dtype)
    return out


def test_singular_value_reweight_matches_numpy_float64_and_keeps_other_rows():
    e = torch.randn(77, 64, generator=torch.Generator().manual_seed(0))
    rows = [5, 6, 7, 40, 41]
    got = ops.singular_value_reweight(e, rows, 0.3, 0.5, -1.0)
    want = numpy_reweight(e.numpy(), rows, 0.3, 0.5, -1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    other = [i for i in range(77) if i not in rows]
    assert torch.equal(got[other], e[other])
    assert not torch.allclose(got[rows], e[rows])


def test_svr_is_suppress_each_then_express_with_eot():
    e = torch.randn(77, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sets = ops.token_sets(2, [2, 3, 2], ops.FramePrompt((0, 1, 2), 1))
    k = ops.SVRConstants(0.02, 1.1, 0.03, 0.2)
    want = e.numpy()
    for rows in sets.suppress:
        want = numpy_reweight(want, rows + sets.eot, 0.03, 0.2, -1)
    want = numpy_reweight(want, sets.express + sets.eot, 0.02, 1.1, +1)
    np.testing.assert_allclose(ops.svr(e, sets, k).numpy(), want, rtol=1e-10, atol=1e-10)


def test_svr_with_identity_constants_changes_nothing():
    e = torch.randn(77, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sets = ops.token_sets(2, [2, 3], ops.FramePrompt((0, 1), 0))
    same = ops.svr(e, sets, ops.SVRConstants(0.0, 1.0, 0.0, 1.0))
    torch.testing.assert_close(same, e, rtol=1e-12, atol=1e-12)


def test_npr_scales_express_and_other_frames_only():
    e = torch.randn(77, 8)
    sets = ops.token_sets(1, [2, 2], ops.FramePrompt((0, 1), 1))
    out = ops.naive_prompt_reweight(e, sets)
    assert torch.equal(out[4:6], e[4:6] * 2) and torch.equal(out[2:4], e[2:4] * 0.5)
    assert torch.equal(out[:2], e[:2]) and torch.equal(out[6:], e[6:])


def test_reweight_parts_treats_each_slice_alone():
    e = torch.randn(77, 12, dtype=torch.float64)
    out = ops.reweight_parts(e, [4, 8], lambda x: x * x.shape[-1])
    assert torch.equal(out[:, :4], e[:, :4] * 4) and torch.equal(out[:, 4:], e[:, 4:] * 8)
    with pytest.raises(ValueError):
        ops.reweight_parts(e, [4, 4], lambda x: x)


# ---------------------------------------------------------------------------------------------- IPCA identity
def attention(q, k, v, bias=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1) @ v


def test_ln2_bias_equals_concatenating_the_identity_columns():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 50, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 54, 16, generator=g, dtype=torch.float64) for _ in range(2))
    n_id = 6
    concat = attention(q, torch.cat([k, k[:, :n_id]], 1), torch.cat([v, v[:, :n_id]], 1))
    biased = attention(q, k, v, ops.ipca_bias(ops.identity_columns(k.shape[1], n_id, k.shape[1]), dtype=q.dtype))
    torch.testing.assert_close(biased, concat, rtol=1e-12, atol=1e-12)


def test_identity_columns_repeat_with_the_context():
    cols = ops.identity_columns(154, 4)
    assert cols.nonzero().flatten().tolist() == [0, 1, 2, 3, 77, 78, 79, 80]


def test_dropout_keeps_every_non_identity_column_and_drops_about_p():
    cols = ops.identity_columns(77, 10)
    keep = ops.dropout_keep((4, 1, 256, 77), 0.5, cols, torch.Generator().manual_seed(0))
    assert keep[..., 10:].all()
    assert abs(keep[..., :10].float().mean().item() - 0.5) < 0.03
    bias = ops.ipca_bias(cols, keep)
    assert bias.shape == keep.shape and torch.equal(bias[..., 10:], torch.zeros_like(bias[..., 10:]))
    ln2 = torch.tensor(math.log(2), dtype=bias.dtype)
    assert torch.equal(bias[..., :10], torch.where(keep[..., :10], ln2, torch.zeros(())))
