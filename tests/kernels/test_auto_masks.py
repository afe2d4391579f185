"""The text-to-image attention maps automatic character masks are made of (no host)."""
from __future__ import annotations

import torch

from storykit.kernels import identity_routing as ident


def _naive(q, k, columns, heads):
    n, c = q.shape
    d = c // heads
    qh, kh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k))
    probs = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1).mean(0)  # [N, L]
    return torch.stack([probs[:, cols].sum(-1) for cols in columns])


def test_maps_equal_softmax_over_text_mean_over_heads_sum_over_columns():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(37, 4 * 8, generator=g), torch.randn(21, 4 * 8, generator=g)
    columns = [torch.tensor([2, 3, 4]), torch.tensor([10, 11, 30])]  # 30 is past the text: ignored
    want = _naive(q, k, [columns[0], columns[1][:2]], 4)
    for budget in (16 << 20, 1):  # one block, and one query per block
        got = ident.text_attention_maps(q, k, columns, heads_first=False, n_heads=4, budget_bytes=budget)
        torch.testing.assert_close(got, want)
    heads_first = ident.text_attention_maps(q.view(37, 4, 8).transpose(0, 1), k.view(21, 4, 8).transpose(0, 1),
                                            columns, heads_first=True)
    torch.testing.assert_close(heads_first, want)
    all_columns = ident.text_attention_maps(q, k, [torch.arange(21)], heads_first=False, n_heads=4)
    torch.testing.assert_close(all_columns, torch.ones(1, 37))


def test_maps_of_half_precision_inputs_are_float32_and_empty_sets_zero():
    q, k = torch.randn(16, 32).half(), torch.randn(8, 32).half()
    got = ident.text_attention_maps(q, k, [torch.tensor([1]), torch.zeros(0, dtype=torch.long)], False, 2)
    assert got.dtype == torch.float32 and got.shape == (2, 16) and got[1].eq(0).all() and got[0].gt(0).all()


def test_two_characters_without_masks_share_nothing_and_say_so(caplog):
    routing = ident.Routing(["Lena", "Bob"])
    routing.add_frame(0, ["Lena", "Bob"])
    routing.no_mask(0, 1, "no tokens")
    routing.no_mask(0, 2, "no tokens")
    with caplog.at_level("WARNING", logger="storykit"):
        assert routing.labels(0, (4, 4)).eq(ident.UNKNOWN).all()
    assert any("Lena and Bob have no mask; they share nothing" in r.getMessage() for r in caplog.records)
