"""Consistent Self-Attention inside the real host on tiny SD1.5/SDXL-like models (CPU)."""
from __future__ import annotations

import copy

import pytest
import torch

from storykit.kernels import consistent_attention as csa


def _patch(model, rate=1.0, layers="decoder", **kw):
    from storykit.nodes import csa_patch
    args = dict(rates=[rate], layer_set=layers, start_percent=0.0, end_percent=1.0, skip_probability=0.0, seed=7,
                window=0, bank_dtype=torch.float32, bank_storage="cpu")
    args.update(kw)
    return csa_patch.patch_model(model, **args)


def _apply(patcher, x, context, cond_or_uncond, sigma=1.5):
    """One UNet call the way comfy.samplers makes it: chunks of cond/uncond rows, transformer options attached."""
    options = dict(patcher.model_options["transformer_options"])
    sigmas = torch.full((x.shape[0],), sigma)
    options.update({"cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas})
    return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options)


def _inputs(frames, halves=2, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames * halves, 4, size, size, generator=g)
    ctx = torch.randn(frames * halves, 77, 768, generator=g) * 0.5
    return x, ctx


def _hook_attn1(patcher):
    """Record (n, attention output before to_out) of every attn1 layer, keyed like transformer_options."""
    from storykit.nodes import csa_patch
    layers = csa_patch.self_attention_layers(patcher.model.diffusion_model)
    seen, handles = {}, []
    for key, attn in layers.items():
        handles.append(attn.to_q.register_forward_hook(
            lambda m, a, o, key=key: seen.setdefault(key, {}).__setitem__("n", a[0].detach().clone())))
        handles.append(attn.to_out[0].register_forward_hook(
            lambda m, a, o, key=key: seen.setdefault(key, {}).__setitem__("out", a[0].detach().clone())))
    return layers, seen, handles


def _manual(attn, n, heads, frames):
    """Frame i attends to its own tokens and to every token of the other frames: computed from scratch."""
    outs = []
    for i in range(frames):
        others = [n[j] for j in range(frames) if j != i]
        kv_in = torch.cat([n[i]] + others)
        q, k, v = attn.to_q(n[i]), attn.to_k(kv_in), attn.to_v(kv_in)
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        outs.append((w @ v).transpose(0, 1).reshape(n.shape[1], heads * d))
    return torch.stack(outs)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_rate_one_is_attention_over_all_frames_per_cfg_half(kind, tiny_sd15, tiny_sdxl):
    model = (tiny_sd15 if kind == "sd15" else tiny_sdxl)[0]
    patched = _patch(model.clone(), rate=1.0)
    frames = 3
    x, ctx = _inputs(frames)
    if kind == "sdxl":
        ctx = torch.randn(frames * 2, 77, 2048, generator=torch.Generator().manual_seed(3)) * 0.5
    layers, seen, handles = _hook_attn1(patched)
    try:
        with torch.no_grad():
            kwargs = {}
            if kind == "sdxl":
                kwargs["y"] = torch.zeros(frames * 2, 2816)
            options = dict(patched.model_options["transformer_options"])
            sigmas = torch.full((x.shape[0],), 1.5)
            options.update({"cond_or_uncond": [1, 0], "sigmas": sigmas})
            patched.model.apply_model(x, sigmas, c_crossattn=ctx, transformer_options=options, **kwargs)
    finally:
        for h in handles:
            h.remove()
    checked = 0
    for key, attn in layers.items():
        n, out = seen[key]["n"], seen[key]["out"]
        heads = attn.heads
        for half in range(2):
            rows = slice(half * frames, (half + 1) * frames)
            if key[0] == "output":
                expected = _manual(attn, n[rows], heads, frames)
            else:  # layers outside the selection: plain self-attention of each frame
                expected = torch.stack([_manual(attn, n[rows][i:i + 1], heads, 1)[0] for i in range(frames)])
            torch.testing.assert_close(out[rows], expected, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == 2 * len(layers) and any(k[0] == "output" for k in layers)


def test_sampled_count_per_other_frame_and_unselected_layers_plain(tiny_sd15, monkeypatch):
    import comfy.ldm.modules.attention as host_attention
    patched = _patch(tiny_sd15[0].clone(), rate=0.3)
    lengths = []
    real = host_attention.optimized_attention

    def recording(q, k, v, heads, *a, **kw):
        lengths.append((q.shape[0], q.shape[1], k.shape[1]))
        return real(q, k, v, heads, *a, **kw)
    monkeypatch.setattr(host_attention, "optimized_attention", recording)
    frames = 4
    x, ctx = _inputs(frames, halves=1)
    with torch.no_grad():
        _apply(patched, x, ctx, [0])
    extended = [(b, n, kv) for b, n, kv in lengths if kv > n and kv != 77]  # (cross-attention has 77 keys)
    assert extended, "no layer attended over other frames"
    for _b, n, kv in extended:
        assert kv == n + (frames - 1) * csa.sample_count(n, 0.3)
    # encoder + middle (3 layers) run plain: the replace is only installed on decoder layers
    from storykit.nodes import csa_patch
    layers = csa_patch.self_attention_layers(patched.model.diffusion_model)
    assert len(extended) == sum(1 for k in layers if k[0] == "output")


def test_cfg_halves_never_mix_one_call_or_two(tiny_sd15):
    patched = _patch(tiny_sd15[0].clone(), rate=0.5)
    frames = 3
    x, ctx = _inputs(frames)
    with torch.no_grad():
        both = _apply(patched, x, ctx, [1, 0])
        uncond = _apply(patched, x[:frames], ctx[:frames], [1])
        cond = _apply(patched, x[frames:], ctx[frames:], [0])
        torch.testing.assert_close(both, torch.cat([uncond, cond]), atol=1e-5, rtol=1e-5)
        x2 = x.clone()
        x2[frames:] = torch.randn_like(x2[frames:])  # change only the cond rows
        changed = _apply(patched, x2, ctx, [1, 0])
    torch.testing.assert_close(changed[:frames], both[:frames], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[frames:], both[frames:])


def test_frames_actually_interact_and_encoder_is_untouched(tiny_sd15):
    base = tiny_sd15[0].clone()
    patched = _patch(tiny_sd15[0].clone(), rate=1.0)
    frames = 3
    x, ctx = _inputs(frames, halves=1)
    layers_p, seen_p, handles = _hook_attn1(patched)
    with torch.no_grad():
        out_p = _apply(patched, x, ctx, [0])
    for h in handles:
        h.remove()
    _, seen_b, handles = _hook_attn1(base)
    with torch.no_grad():
        out_b = _apply(base, x, ctx, [0])
    for h in handles:
        h.remove()
    for key in layers_p:
        if key[0] != "output":
            assert torch.equal(seen_p[key]["out"], seen_b[key]["out"]), key
    assert not torch.allclose(out_p, out_b, atol=1e-6)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_bank_read_reproduces_batch_result(tiny_sd15, rate):
    from storykit.nodes.csa_patch import StoryFrame
    patched = _patch(tiny_sd15[0].clone(), rate=rate)
    state = patched.get_attachment("storykit_csa")
    hero = frozenset({"Mia"})
    x, ctx = _inputs(4, halves=2, seed=5)
    order = [0, 1, 2, 3]

    def rows(idx):  # the same frames in both halves (uncond rows first)
        return idx + [i + 4 for i in idx]
    with torch.no_grad(), state.story_run():
        state.plan = [StoryFrame(i, hero, i < 3) for i in order]
        together = _apply(patched, x, ctx, [1, 0])
        assert state.bank.nbytes() > 0
        state.release()
        state.plan = [StoryFrame(i, hero, True) for i in range(3)]
        refs = _apply(patched, x[rows([0, 1, 2])], ctx[rows([0, 1, 2])], [1, 0])
        state.plan = [StoryFrame(3, hero, False)]
        alone = _apply(patched, x[rows([3])], ctx[rows([3])], [1, 0])
    torch.testing.assert_close(refs, together[rows([0, 1, 2])], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, together[rows([3])], atol=1e-5, rtol=1e-5)
    assert state.bank.nbytes() == 0  # released when the story run ended


def test_input_model_unchanged_and_patched_models_do_not_share_state(tiny_sd15):
    model = tiny_sd15[0].clone()
    before = copy.deepcopy(model.model_options)
    a, b = _patch(model, rate=0.5), _patch(model, rate=1.0)
    assert model.model_options == before
    assert not model.model_options["transformer_options"].get("patches_replace")
    sa, sb = a.get_attachment("storykit_csa"), b.get_attachment("storykit_csa")
    assert sa is not sb and sa.bank is not sb.bank
    clone = a.clone()
    assert clone.get_attachment("storykit_csa") is sa  # clones of one patched model share its run state
    replace = clone.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert all(p.__self__ is sa.site and p.__self__.technique is sa for p in replace.values())


def test_ksampler_run_releases_bank_and_model_unchanged(tiny_sd15):
    import comfy.sample
    from storykit.nodes.csa_patch import StoryFrame
    patched = _patch(tiny_sd15[0].clone(), rate=0.5)
    state = patched.get_attachment("storykit_csa")
    peak = []
    real_release = state.release

    def release():
        peak.append(state.bank.nbytes())
        real_release()
    state.release = release
    state.plan = [StoryFrame(0, frozenset({"A"}), True), StoryFrame(1, frozenset({"A"}), True)]
    latent = torch.zeros(2, 4, 8, 8)
    positive = [[torch.randn(2, 77, 768), {}]]
    negative = [[torch.randn(1, 77, 768), {}]]
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(patched, noise, 2, 3.0, "euler", "normal", positive, negative, latent,
                              disable_pbar=True, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert peak and peak[0] > 0 and state.bank.nbytes() == 0


def test_sliding_window_averages_windows_algorithm_1(tiny_sd15):
    patched = _patch(tiny_sd15[0].clone(), rate=1.0, window=2)
    frames = 3
    x, ctx = _inputs(frames, halves=2, seed=9)
    layers, seen, handles = _hook_attn1(patched)
    try:
        with torch.no_grad():
            _apply(patched, x, ctx, [0, 1])
    finally:
        for h in handles:
            h.remove()
    key = next(k for k in layers if k[0] == "output")
    attn, n, out = layers[key], seen[key]["n"], seen[key]["out"]
    for half in range(2):
        rows = n[half * frames:(half + 1) * frames]
        first, second = _manual(attn, rows[[0, 1]], attn.heads, 2), _manual(attn, rows[[1, 2]], attn.heads, 2)
        expected = torch.stack([first[0], (first[1] + second[0]) / 2, second[1]])
        torch.testing.assert_close(out[half * frames:(half + 1) * frames], expected, atol=2e-5, rtol=1e-4)


def test_step_range_and_skip_probability_turn_sharing_off(tiny_sd15):
    base = tiny_sd15[0].clone()
    x, ctx = _inputs(3, halves=1, seed=4)
    late = _patch(tiny_sd15[0].clone(), start_percent=0.9)  # only the last 10% of the schedule: low sigmas
    always_skip = _patch(tiny_sd15[0].clone(), skip_probability=1.0)
    half_skip = _patch(tiny_sd15[0].clone(), rate=0.5, skip_probability=0.5)
    with torch.no_grad():
        plain = _apply(base, x, ctx, [0], sigma=5.0)
        torch.testing.assert_close(_apply(late, x, ctx, [0], sigma=5.0), plain, atol=0, rtol=0)
        assert not torch.allclose(_apply(late, x, ctx, [0], sigma=0.05), _apply(base, x, ctx, [0], sigma=0.05))
        torch.testing.assert_close(_apply(always_skip, x, ctx, [0], sigma=5.0), plain, atol=0, rtol=0)
        first, again = _apply(half_skip, x, ctx, [0], sigma=5.0), _apply(half_skip, x, ctx, [0], sigma=5.0)
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # the skip draw is seeded: same call, same result
