"""Consistent Self-Attention on DiT joint attention, inside the real host on the tiny DiT families (CPU).

Each test runs the family's real model class through `apply_model` the way comfy.samplers calls it (rows stacked
by CFG half, transformer options attached). The exactness tests spy on the site's override to see the q, k, v the
host hands it and check its output against attention computed from scratch."""
from __future__ import annotations

import pytest
import torch

from storykit.runner import ditmodels, testmodels

KINDS = [k for k in ditmodels.DIT_KINDS if k in getattr(ditmodels, "BUILT", ditmodels.DIT_KINDS)]


def _available(kind):
    try:
        return testmodels.tiny_models(kind, 0)
    except ValueError as exc:  # a family the test-model builder does not have yet
        pytest.skip(str(exc))


def _patch(model, rate=1.0, blocks="", **kw):
    from storykit.nodes import csa_patch
    args = dict(rates=[rate], layer_set="decoder", start_percent=0.0, end_percent=1.0, skip_probability=0.0,
                seed=7, window=0, bank_dtype=torch.float32, bank_storage="cpu", blocks=blocks)
    args.update(kw)
    return csa_patch.patch_model(model, **args)


def _inputs(model, clip, frames, halves=1, seed=0, size=8):
    """Latents and the model's own per-row conditioning of one call (frames x halves rows), built by the family's
    extra_conds as the sampler builds them."""
    g = torch.Generator().manual_seed(seed)
    channels = model.model.latent_format.latent_channels
    rows = frames * halves
    time = (1,) if getattr(model.model.latent_format, "latent_dimensions", 2) == 3 else ()
    x = torch.randn(rows, channels, *time, size, size, generator=g)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox in the snow"))[0]
    text, pooled = cond[0], cond[1].get("pooled_output")
    text = text.repeat(rows, 1, 1) + 0.1 * torch.randn(rows, *text.shape[1:], generator=g)
    conds = model.model.extra_conds(cross_attn=text, pooled_output=None if pooled is None else pooled.repeat(rows, 1),
                                    guidance=3.5, noise=x, device=x.device, width=size * 8, height=size * 8)
    extra = {key: value.process_cond(batch_size=rows, device=x.device).cond for key, value in conds.items()}
    return x, extra.pop("c_crossattn"), extra


def _apply(patcher, x, context, extra, cond_or_uncond, sigma=0.6):
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers  # as comfy.samplers hands the patcher's wrappers to the model call
    sigmas = torch.full((x.shape[0],), sigma)
    options.update({"cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas})
    with torch.no_grad():
        return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=options, **extra)


def _rows(value, rows):
    return value[rows] if isinstance(value, torch.Tensor) and value.ndim else value


def _spy(monkeypatch):
    """Record every call of the site's override: its inputs, the unpatched result and what the override returned."""
    from storykit.nodes import attention_sites
    seen = []
    real = attention_sites.JointAttention.attention

    def spying(self, technique, layout, previous, func, *args, **kwargs):
        out = real(self, technique, layout, previous, func, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        seen.append({"block": self._block(options), "layout": layout, "selected": self._block(options) in self.blocks,
                     "args": args, "kwargs": dict(kwargs), "out": out, "plain": func(*args, **kwargs),
                     "halves": options.get("cond_or_uncond")})
        return out
    monkeypatch.setattr(attention_sites.JointAttention, "attention", spying)
    return seen


def _canonical(t, split):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) if split else t


def _from_scratch(q, k, v, heads, image, frames_of_half):
    """Image queries of each frame over [its own keys ; every other frame's (same half) image keys]."""
    out = torch.empty(q.shape[0], image.stop - image.start, q.shape[-1])
    d = q.shape[-1] // heads
    for rows in frames_of_half:
        for i in rows:
            keys = torch.cat([k[i]] + [k[j, image] for j in rows if j != i])
            values = torch.cat([v[i]] + [v[j, image] for j in rows if j != i])
            qh, kh, vh = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q[i, image], keys, values))
            w = torch.softmax(qh.double() @ kh.double().transpose(-1, -2) / d ** 0.5, dim=-1)
            out[i] = (w @ vh.double()).transpose(0, 1).reshape(-1, heads * d).float()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_rate_one_is_joint_attention_over_all_frames_and_text_is_untouched(host, kind, monkeypatch):
    model, clip, _ = _available(kind)
    patched = _patch(model.clone(), rate=1.0)
    frames = 3
    x, context, extra = _inputs(model, clip, frames, halves=2)
    seen = _spy(monkeypatch)
    _apply(patched, x, context, extra, [1, 0])
    checked = 0
    for call in seen:
        q, k, v = call["args"][:3]
        heads = call["args"][3] if len(call["args"]) > 3 else call["kwargs"]["heads"]
        split = bool(call["kwargs"].get("skip_reshape"))
        n_text, n_image, _ = call["layout"]
        length = q.shape[2 if split else 1]
        if not call["selected"] or length < n_image:
            assert torch.equal(call["out"], call["plain"]), call["block"]
            continue
        start = 0 if (call["block"][0] == "refiner" or not n_text) else n_text
        image = slice(start, start + n_image)
        qc, kc, vc = (_canonical(t, split) for t in (q, k, v))
        expected = _from_scratch(qc, kc, vc, heads, image, [range(0, frames), range(frames, 2 * frames)])
        torch.testing.assert_close(call["out"][:, image], expected, atol=2e-5, rtol=1e-4)
        # text (and any other non-image) tokens: the unpatched attention, bit for bit
        assert torch.equal(call["out"][:, :start], call["plain"][:, :start]), call["block"]
        assert torch.equal(call["out"][:, image.stop:], call["plain"][:, image.stop:]), call["block"]
        checked += 1
    assert checked >= 1 and len(seen) >= checked


@pytest.mark.parametrize("kind", KINDS)
def test_uncond_never_sees_cond_and_rate_zero_or_outside_steps_is_unpatched(host, kind):
    model, clip, _ = _available(kind)
    patched = _patch(model.clone(), rate=0.5)
    frames = 3
    x, context, extra = _inputs(model, clip, frames, halves=2)
    both = _apply(patched, x, context, extra, [1, 0])
    half = {key: _rows(value, slice(0, frames)) for key, value in extra.items()}
    other = {key: _rows(value, slice(frames, None)) for key, value in extra.items()}
    uncond = _apply(patched, x[:frames], context[:frames], half, [1])
    cond = _apply(patched, x[frames:], context[frames:], other, [0])
    torch.testing.assert_close(both, torch.cat([uncond, cond]), atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[frames:] = torch.randn_like(x2[frames:])
    changed = _apply(patched, x2, context, extra, [1, 0])
    torch.testing.assert_close(changed[:frames], both[:frames], atol=1e-6, rtol=1e-6)
    plain = _apply(model, x, context, extra, [1, 0])
    assert not torch.allclose(both, plain, atol=1e-6), "frames did not interact"
    for off in (_patch(model.clone(), rate=0.0), _patch(model.clone(), rate=1.0, start_percent=0.9)):
        assert torch.equal(_apply(off, x, context, extra, [1, 0]), plain)


@pytest.mark.parametrize("kind", KINDS)
def test_composes_with_a_lora_and_another_packs_override(host, kind):
    model, clip, _ = _available(kind)
    frames = 2
    x, context, extra = _inputs(model, clip, frames)
    base = _apply(model, x, context, extra, [0])
    csa_only = _apply(_patch(model.clone(), rate=1.0), x, context, extra, [0])

    lora = model.clone()  # a weight patch as LoRA loaders add them
    key = next(k for k in lora.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")
               and lora.model.state_dict()[k].ndim == 2)
    lora.add_patches({key: (torch.randn_like(lora.model.state_dict()[key]) * 0.05,)}, 1.0)
    calls = []

    def other_pack(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs) * 1.01
    lora.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_pack
    import comfy.model_management
    comfy.model_management.load_models_gpu([lora])
    lora_only = _apply(lora, x, context, extra, [0])
    calls.clear()
    both = _apply(_patch(lora, rate=1.0), x, context, extra, [0])
    assert calls, "the other pack's override was not chained"
    for other in (base, csa_only, lora_only):
        assert not torch.allclose(both, other, atol=1e-6)
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("kind", KINDS)
def test_block_ranges_defaults_and_errors(host, kind):
    from storykit.nodes import attention_sites, csa_patch
    model, _, _ = _available(kind)
    site = csa_patch.model_site(model)
    available = attention_sites.JointAttention.available(site.family, model.model.diffusion_model)
    assert site.blocks and all(i < available[k] for k, i in site.blocks)
    kind0 = next(iter(available))
    one = csa_patch.model_site(model, blocks=f"{kind0} 0")
    assert one.blocks == {(kind0, 0)}
    with pytest.raises(ValueError, match=rf"outside the model; valid ranges: .*{kind0} 0-{available[kind0] - 1}"):
        csa_patch.model_site(model, blocks=f"{kind0} 0-{available[kind0]}")
    with pytest.raises(ValueError, match="has no 'middle' blocks"):
        csa_patch.model_site(model, blocks="middle 0")
    before = dict(model.model_options.get("transformer_options", {}))
    with pytest.raises(ValueError):
        _patch(model, blocks="nonsense")
    assert model.model_options.get("transformer_options", {}) == before, "nothing half-patched"


def test_unsupported_model_names_the_class_and_the_families(host):
    from storykit.nodes import csa_patch
    from storykit.tests import transition_models
    wan = transition_models.wan()
    before = dict(wan.model_options.get("transformer_options", {}))
    with pytest.raises(ValueError, match=r"WAN21 is not a model StoryKit can patch; supported: .*FLUX"):
        _patch(wan)
    assert wan.model_options.get("transformer_options", {}) == before
    assert csa_patch.NODE in str(pytest.raises(ValueError, csa_patch.model_site, wan).value)
