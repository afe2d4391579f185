"""Kernel tests for identity routing (bounded sharing, masks, boxes): no host needed."""
from __future__ import annotations

import pytest
import torch

from storykit.kernels import consistent_attention as csa
from storykit.kernels import identity_routing as ident

HEADS = 2


def _probabilities(q, keys, heads=HEADS):
    """Softmax weights [heads, Nq, L] of plain multi-head attention (what the host computes)."""
    d = q.shape[-1] // heads
    qh, kh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, keys))
    return torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)


def _story(seed=0, rows=3, n=36, dim=8):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(rows, n, dim) for _ in range(3))
    samples = {j: csa.sample_tokens(n, 0.5, j) for j in range(rows)}
    sources = [[j for j in range(rows) if j != i] for i in range(rows)]
    return q, k, v, samples, sources


def test_one_label_everywhere_is_plain_csa():
    q, k, v, samples, sources = _story()
    labels = [torch.ones(36, dtype=torch.long) for _ in range(3)]
    plain = csa.consistent_self_attention(q, k, v, csa.default_attention(HEADS), sources, samples)
    routed = csa.routed_attention(q, k, v, csa.default_attention(HEADS), sources, samples,
                                  {j: labels[j][s] for j, s in samples.items()}, labels)
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share_background", [True, False])
def test_each_query_reads_only_its_own_characters_shared_tokens(share_background):
    """Row 0 holds A (label 1) on the left and B (label 2) on the right; rows 1 and 2 are A's and B's references.
    The routed output of each query equals attention over [own row ; the shared tokens with its label] only."""
    q, k, v, samples, sources = _story(1)
    left = torch.arange(36) % 6 < 3
    meeting = torch.where(left, 1, 2)
    meeting[:6] = 0  # a background strip
    a_ref, b_ref = torch.where(left, 1, 0), torch.where(~left, 2, 0)
    labels = [meeting, a_ref, b_ref]
    sample_labels = {j: labels[j][s] for j, s in samples.items()}
    out = csa.routed_attention(q, k, v, csa.default_attention(HEADS), sources, samples, sample_labels, labels,
                               share_background=share_background)
    for label in (0, 1, 2):
        rows = (meeting == label).nonzero().flatten()
        keys, values = [k[0]], [v[0]]
        if label or share_background:
            for j in (1, 2):
                pick = samples[j][sample_labels[j] == label]
                keys.append(k[j][pick])
                values.append(v[j][pick])
        expected = csa.default_attention(HEADS)(q[0:1, rows], torch.cat(keys)[None], torch.cat(values)[None])[0]
        torch.testing.assert_close(out[0, rows], expected, rtol=1e-5, atol=1e-6)


def test_identity_leak_is_zero_routed_and_measurable_unrouted():
    """The attention mass from A's queries (frame 0) to B's shared tokens: > 0 with plain CSA, exactly 0 routed
    (B's tokens are not among the keys of any A query's call)."""
    q, k, v, samples, sources = _story(2)
    left = torch.arange(36) % 6 < 3
    meeting = torch.where(left, 1, 2)
    labels = [meeting, torch.ones(36, dtype=torch.long), torch.full((36,), 2)]
    a_queries = q[0, meeting == 1]
    keys = torch.cat([k[0], k[1][samples[1]], k[2][samples[2]]])
    weights = _probabilities(a_queries, keys)
    b_columns = slice(36 + samples[1].numel(), keys.shape[0])
    assert float(weights[..., b_columns].sum(-1).mean()) > 0.05  # plain CSA: A reads B

    seen = []

    def spy(qq, kk, vv):
        seen.append((qq[0], kk[0]))
        return csa.default_attention(HEADS)(qq, kk, vv)
    csa.routed_attention(q, k, v, spy, sources, samples, {j: labels[j][s] for j, s in samples.items()}, labels)
    b_keys = k[2][samples[2]]
    a_calls = [kk for qq, kk in seen if torch.equal(qq, a_queries)]
    assert len(a_calls) == 1 and a_calls[0].shape[0] == 36 + samples[1].numel()
    assert not (a_calls[0][:, None] == b_keys[None]).all(-1).any()


def test_bank_tokens_are_routed_by_their_stored_labels():
    q, k, v, samples, _ = _story(3, rows=1)
    bank_k, bank_v = torch.randn(10, 8), torch.randn(10, 8)
    bank_labels = torch.tensor([1] * 4 + [2] * 6)
    labels = [torch.ones(36, dtype=torch.long)]
    out = csa.routed_attention(q, k, v, csa.default_attention(HEADS), [[]], {}, {}, labels, bank_k, bank_v,
                               [[(0, 10)]], bank_labels)
    expected = csa.default_attention(HEADS)(q, torch.cat([k[0], bank_k[:4]])[None], torch.cat([v[0], bank_v[:4]])[None])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_heads_first_routed_matches_token_major():
    q, k, v, samples, sources = _story(4)
    labels = [torch.randint(-1, 3, (36,)) for _ in range(3)]
    sample_labels = {j: labels[j][s] for j, s in samples.items()}
    token_major = csa.routed_attention(q, k, v, csa.default_attention(HEADS), sources, samples, sample_labels,
                                       labels)

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)

    def attend(qq, kk, vv):
        out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    heads_first = csa.routed_attention(split(q), split(k), split(v), attend, sources, samples, sample_labels, labels,
                                       heads_first=True)
    torch.testing.assert_close(heads_first, token_major, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text,box", [("left", (0, 0, 0.5, 1)), ("Top-Right", (0.5, 0, 1, 0.5)),
                                      ("0.1, 0.2, 0.6, 1", (0.1, 0.2, 0.6, 1.0))])
def test_parse_box(text, box):
    assert ident.parse_box(text) == pytest.approx(box)


@pytest.mark.parametrize("text", ["leftish", "0.5,0.2,0.4,1", "0,0,1.5,1", "1,2,3"])
def test_parse_box_errors_say_how_to_write_it(text):
    with pytest.raises(ValueError, match="x0,y0,x1,y1|between 0 and 1"):
        ident.parse_box(text)


def test_box_mask_and_labels_on_a_coarser_grid():
    mask = ident.box_mask(ident.parse_box("left"), 16, 24)
    assert mask.shape == (16, 24) and mask[:, :12].all() and not mask[:, 12:].any()
    labels = ident.labels_from_masks({1: mask, 2: 1 - mask}, (4, 6), ident.BACKGROUND)
    assert labels.view(4, 6)[:, :3].eq(1).all() and labels.view(4, 6)[:, 3:].eq(2).all()
    partial = ident.labels_from_masks({1: mask}, (4, 6), ident.UNKNOWN)
    assert partial.view(4, 6)[:, 3:].eq(ident.UNKNOWN).all()


def test_otsu_splits_two_modes():
    values = torch.cat([torch.full((100,), 0.2), torch.full((50,), 0.8)]) + 0.01 * torch.randn(150)
    assert 0.25 < ident.otsu_threshold(values) <= 0.8


def test_routing_auto_masks_fold_per_step_and_unknown_until_then():
    routing = ident.Routing(["Lena", "Bob"])
    routing.add_frame(0, ["Lena", "Bob"])
    routing.add_frame(1, ["Lena"])
    routing.at_sigma(10.0)
    assert routing.bounded() and routing.labels(0, (4, 4)).eq(ident.UNKNOWN).all()
    assert routing.labels(1, (4, 4)).eq(1).all()  # one character, no mask: hers everywhere (plain CSA)
    left = ident.box_mask(ident.BOXES["left"], 8, 8)
    routing.add_map(0, 1, left * 5 + 0.1 * torch.rand(8, 8))
    routing.add_map(0, 2, (1 - left) * 3 + 0.1 * torch.rand(8, 8))
    assert routing.labels(0, (4, 4)).eq(ident.UNKNOWN).all()  # this step still reads the last step's masks
    routing.at_sigma(9.0)
    labels = routing.labels(0, (4, 4)).view(4, 4)
    assert labels[:, :2].eq(1).all() and labels[:, 2:].eq(2).all()


def test_colour_labels():
    picture = ident.colour_labels(torch.tensor([-1, 0, 1, 2]), (2, 2))
    assert picture.shape == (2, 2, 3)
    assert picture[0, 1].eq(0).all() and not torch.equal(picture[1, 0], picture[1, 1])
