"""Kernel tests for Consistent Self-Attention: no host needed."""
from __future__ import annotations

import pytest
import torch

from storykit.kernels import consistent_attention as csa


@pytest.mark.parametrize("n,rate", [(1024, 0.5), (4096, 0.3), (77, 0.7), (10, 0.0), (10, 1.0), (3, 0.5)])
def test_sample_count_is_rounded_rate_uniform_without_replacement(n, rate):
    idx = csa.sample_tokens(n, rate, seed=123)
    assert idx.numel() == round(rate * n) == csa.sample_count(n, rate)
    assert idx.unique().numel() == idx.numel()
    assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)
    assert torch.equal(idx, csa.sample_tokens(n, rate, seed=123))


def test_sampling_is_seeded_and_roughly_uniform():
    a, b = csa.sample_tokens(1000, 0.5, 1), csa.sample_tokens(1000, 0.5, 2)
    assert not torch.equal(a, b)
    hits = torch.zeros(100)
    for seed in range(400):
        hits += torch.bincount(csa.sample_tokens(100, 0.25, seed), minlength=100)
    assert hits.min() > 60 and hits.max() < 140  # each token picked about 100 times in 400 draws


def test_stable_seed_is_deterministic_and_distinguishes_parts():
    assert csa.stable_seed(1, "a", 2.5) == csa.stable_seed(1, "a", 2.5)
    assert csa.stable_seed(1, "a", 2.5) != csa.stable_seed(1, "a", 2.5000001)
    assert 0 <= csa.uniform(csa.stable_seed(3)) < 1


def _manual(q, k, v, heads, i, source_rows):
    kk = torch.cat([k[i]] + [k[j][idx] for j, idx in source_rows])
    vv = torch.cat([v[i]] + [v[j][idx] for j, idx in source_rows])
    d = q.shape[-1] // heads
    qh, kh, vh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q[i], kk, vv))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (w @ vh).transpose(0, 1).reshape(q.shape[1], -1)


def test_consistent_self_attention_matches_per_frame_concatenation():
    torch.manual_seed(0)
    b, n, dim, heads = 4, 32, 16, 2
    q, k, v = (torch.randn(b, n, dim) for _ in range(3))
    samples = {j: csa.sample_tokens(n, 0.5, j) for j in range(b)}
    sources = [[j for j in range(b) if j != i] for i in range(b)]
    out = csa.consistent_self_attention(q, k, v, csa.default_attention(heads), sources, samples)
    for i in range(b):
        expected = _manual(q, k, v, heads, i, [(j, samples[j]) for j in sources[i]])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_own_tokens_are_never_sampled_and_rows_without_sources_are_plain():
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 8, 8) for _ in range(3))
    attend = csa.default_attention(2)
    with pytest.raises(ValueError, match="own tokens"):
        csa.consistent_self_attention(q, k, v, attend, [[0], [], []], {0: torch.arange(4)})
    out = csa.consistent_self_attention(q, k, v, attend, [[], [], []], {})
    torch.testing.assert_close(out, attend(q, k, v))
    index = csa.key_value_index(8, 1, [(0, torch.tensor([1, 3])), (16, torch.tensor([2]))])
    assert index.tolist() == list(range(8, 16)) + [1, 3, 18]


def test_bank_tokens_equal_in_batch_reference_tokens():
    torch.manual_seed(2)
    n, dim, heads = 16, 8, 2
    q, k, v = (torch.randn(4, n, dim) for _ in range(3))
    samples = {j: csa.sample_tokens(n, 0.5, 10 + j) for j in range(3)}
    attend = csa.default_attention(heads)
    together = csa.consistent_self_attention(q, k, v, attend, [[1, 2], [0, 2], [0, 1], [0, 1, 2]], samples)
    bank_k = torch.cat([k[j][samples[j]] for j in range(3)])
    bank_v = torch.cat([v[j][samples[j]] for j in range(3)])
    m = samples[0].numel()
    alone = csa.consistent_self_attention(q[3:], k[3:], v[3:], attend, [[]], {}, bank_k, bank_v,
                                          [[(0, m), (m, m), (2 * m, m)]])
    torch.testing.assert_close(alone[0], together[3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("frames,window", [(10, 4), (7, 3), (5, 5), (3, 8), (9, 2)])
def test_sliding_windows_cover_every_frame(frames, window):
    windows = csa.sliding_windows(frames, window)
    assert sorted({f for w in windows for f in w}) == list(range(frames))
    assert all(len(w) == min(window, frames) for w in windows)
    assert windows[-1][-1] == frames - 1


def test_windowed_averages_outputs_of_covering_windows():
    x = torch.arange(6, dtype=torch.float32).view(6, 1)
    calls = []

    def run(members):
        calls.append(members)
        return torch.full((len(members), 1), float(len(calls)))
    out = csa.windowed(6, 4, run, x)
    assert calls == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert out.flatten().tolist() == [1, 1, 1.5, 1.5, 2, 2]


def test_reference_bank_keys_by_sigma_and_counts_bytes():
    bank = csa.ReferenceBank(dtype=torch.float16, storage="cpu")
    layer = ("output", 3, 0)
    for sigma in (14.6, 7.0, 1.2):
        bank.write(layer, 0, sigma, 0, torch.full((5, 4), sigma))
        bank.write(layer, 1, sigma, 0, torch.zeros(5, 4))
    assert bank.nbytes() == 6 * 5 * 4 * 2 and bank.device_nbytes() == 0
    got = bank.read(layer, 0, 7.0, [0, 9], torch.device("cpu"))
    assert list(got) == [0] and got[0].dtype == torch.float16 and float(got[0][0, 0]) == 7.0
    assert float(bank.read(layer, 0, 6.5, [0], torch.device("cpu"))[0][0, 0]) == 7.0  # nearest sigma (Heun, DPM2)
    assert bank.read(("output", 4, 0), 0, 7.0, [0], torch.device("cpu")) == {}
    assert bank.frames() == {0}
    bank.clear()
    assert bank.nbytes() == 0


@pytest.mark.parametrize("budget", [None, 1])
def test_joint_attention_heads_first_matches_token_major_kernel(budget):
    """The DiT kernel (heads-first, image queries a subset of the keys' tokens, bank in heads-first layout) gives
    what the token-major kernel gives on the same rows, whatever the memory budget (1 byte: one row per call)."""
    torch.manual_seed(3)
    rows, heads, d, n_text, n_image = 4, 2, 8, 3, 10
    length = n_text + n_image
    q, k, v = (torch.randn(rows, heads, length, d) for _ in range(3))
    samples = {j: csa.sample_tokens(n_image, 0.5, j) + n_text for j in range(rows)}
    sources = [[j for j in range(3) if j != i] if i < 3 else [0] for i in range(rows)]
    bank = torch.randn(2, 6, heads * d)  # keys, values of 6 bank tokens, token-major
    spans = [[], [(0, 3)], [(0, 6)], [(3, 3)]]

    def flat(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    def attend_flat(q_, k_, v_):
        return csa.default_attention(heads)(q_, k_, v_)

    def attend_heads(q_, k_, v_):
        out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    expected = csa.consistent_self_attention(flat(q)[:, n_text:], flat(k), flat(v), attend_flat, sources, samples,
                                             bank[0], bank[1], spans)
    heads_bank = [b.reshape(6, heads, d).transpose(0, 1) for b in bank]
    got = csa.consistent_joint_attention(q.narrow(2, n_text, n_image), k, v, attend_heads, sources, samples,
                                         heads_bank[0], heads_bank[1], spans, budget_bytes=budget)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
