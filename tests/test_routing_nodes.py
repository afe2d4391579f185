"""Identity routing in the real host: layout boxes, character masks and photos reach bounded sharing with the right
labels on every attention call's token grid, UNet and DiT; the photo enters each step noised to that step; bad
input is refused naming the node and the fix; nothing survives the story run."""
from __future__ import annotations

import sys

import pytest
import torch

from storykit.runner import testmodels

STORY = """[Lena] a woman in a red coat
[Bob] a man in a blue hat
[Lena] reads a letter
[Bob] cooks soup
[Lena@left] and [Bob@right] talk in the kitchen"""


def _prompt(node_class, clip, story=STORY, refs=1):
    return node_class("StoryKitStoryPrompt").execute(
        clip=clip, story=story, style="(none)", custom_style="", negative="", references_per_character=refs,
        reference_mode="auto").result


def _csa(node_class, model, rate=0.5):
    return node_class("StoryKitConsistentSelfAttention").execute(
        model=model, sampling_rate=rate, rate_per_level="", layers="decoder", start_percent=0.0, end_percent=1.0,
        skip_probability=0.0, seed=0, window_size=0, bank_precision="fp32", bank_location="cpu").result[0]


def _sample(node_class, model, positive, negative, plan, size=8, channels=4, steps=2, cfg=4.0, **kw):
    latent = {"samples": torch.zeros(1, channels, size, size)}
    return node_class("StoryKitStorySampler").execute(
        model=model, positive=positive, negative=negative, story=plan, latent_image=latent, seed=3,
        seed_mode="same for all frames", steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
        batch_size=4, denoise=1.0, **kw).result


@pytest.fixture()
def routed_calls(monkeypatch):
    """Every routed_attention call: (query labels, sample labels, bank labels, sources), in every copy of the kernel
    module (the host loads the pack under its own name)."""
    from storykit.kernels import consistent_attention
    calls = []
    modules = {m for n, m in sys.modules.items() if n.endswith("kernels.consistent_attention")}
    for module in modules | {consistent_attention}:
        real = module.routed_attention

        def spy(q, k, v, attention, sources, samples, sample_labels, query_labels, bank_k=None, bank_v=None,
                bank_spans=None, bank_labels=None, share_background=True, heads_first=False, real=real):
            calls.append({"query": [t.clone() for t in query_labels], "samples": dict(sample_labels),
                          "bank": None if bank_labels is None else bank_labels.clone(), "sources": sources,
                          "spans": bank_spans})
            return real(q, k, v, attention, sources, samples, sample_labels, query_labels, bank_k, bank_v,
                        bank_spans, bank_labels, share_background, heads_first)
        monkeypatch.setattr(module, "routed_attention", spy)
    return calls


def _square(labels):
    side = int(round(labels.numel() ** 0.5))
    return labels.view(side, side)


def test_boxes_route_each_half_of_the_meeting_frame_and_the_bank(node_class, tiny_sd15, routed_calls):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = _csa(node_class, model.clone())
    latent, pictures = _sample(node_class, patched, positive, negative, plan)
    plain, _ = _sample(node_class, model, positive, negative, plan)
    meeting = [c for c in routed_calls if c["bank"] is not None]
    assert meeting, "the meeting frame never read the bank through bounded sharing"
    for call in meeting:
        for labels in call["query"]:
            grid = _square(labels)
            half = grid.shape[1] // 2
            assert grid[:, :half].eq(1).all() and grid[:, half:].eq(2).all()  # Lena left, Bob right
        assert set(call["bank"].tolist()) == {1, 2}  # the references wrote their character's labels
    assert not torch.allclose(latent["samples"][2], plain["samples"][2])
    assert pictures.shape == (3, 64, 64, 3)
    assert not torch.equal(pictures[2, :, :32], pictures[2, :, 32:])  # two colours in the meeting frame
    state = patched.get_attachment("storykit_csa")
    assert state.routing is None and state.bank.nbytes() == 0 and not state.photo_inputs


def test_single_character_story_is_not_routed(node_class, tiny_sd15, routed_calls):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, "[Lena] a woman\n[Lena] reads\n[Lena] cooks\n[Lena] sleeps")
    _sample(node_class, _csa(node_class, model.clone()), positive, negative, plan)
    assert not routed_calls


def test_character_mask_and_routing_node(node_class, tiny_sd15, routed_calls):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, STORY.replace("[Lena@left]", "[Lena]")
                                          .replace("[Bob@right]", "[Bob]"))
    top = torch.zeros(1, 64, 64)
    top[:, :32] = 1
    plan = node_class("StoryKitCharacterMask").execute(story=plan, character="lena", mask=top, frames="3").result[0]
    plan = node_class("StoryKitIdentityRouting").execute(story=plan, mode="auto", background="own frame only",
                                                         layout="3: [Bob@bottom]").result[0]
    _sample(node_class, _csa(node_class, model.clone()), positive, negative, plan)
    meeting = [c for c in routed_calls if c["bank"] is not None]
    assert meeting
    for call in meeting:
        for labels in call["query"]:
            grid = _square(labels)
            assert grid[: grid.shape[0] // 2].eq(1).all() and grid[grid.shape[0] // 2:].eq(2).all()


def test_photo_reference_enters_every_step_noised_and_writes_the_bank(node_class, tiny_sd15, monkeypatch):
    import comfy.sample
    model, clip, vae = tiny_sd15
    story = "[Lena] a woman in a red coat\n[Lena] reads a letter\n[Lena] cooks soup"
    positive, negative, plan, _ = _prompt(node_class, clip, story)
    photo = torch.rand(1, 80, 64, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 80, 64)
    mask[:, :, :32] = 1
    base = plan
    plan = node_class("StoryKitCharacterPhoto").execute(story=base, vae=vae, character="Lena", image=photo,
                                                        use="photo only", mask=mask).result[0]
    patched = _csa(node_class, model.clone())
    state = patched.get_attachment("storykit_csa")
    inputs, writes = [], []
    forward = patched.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((args[0].clone(), kwargs["transformer_options"]["sigmas"])),
        with_kwargs=True)
    real_write = state.bank.write
    monkeypatch.setattr(state.bank, "write", lambda *a, **kw: (writes.append((a[3], kw.get("labels",
                                                                a[5] if len(a) > 5 else None))), real_write(*a, **kw)))
    try:
        latent, _ = _sample(node_class, patched, positive, negative, plan)
    finally:
        forward.remove()
    assert {frame for frame, _ in writes} == {2}  # photo only: the photo (frame 2) is the one reference
    assert all(labels is not None and set(labels.tolist()) <= {0, 1} and 1 in labels.tolist()
               for _, labels in writes)
    # the photo's row of the first call is the encoded photo noised to that sigma with its fixed noise
    from storykit.kernels import layout
    x, sigmas = inputs[0]
    pixels = layout.cover_resize(photo[0], 64, 64)[None]
    with torch.no_grad():
        encoded = patched.model.process_latent_in(vae.encode(pixels))
    noise = comfy.sample.prepare_noise(encoded, (3 + 1_000_003) % 2 ** 64)
    sampling = patched.get_model_object("model_sampling")
    sigma = sigmas[:1]
    expected = sampling.calculate_input(sigma, sampling.noise_scaling(sigma, noise, encoded))
    torch.testing.assert_close(x[:1], expected.to(x), atol=1e-4, rtol=1e-4)
    plain, _ = _sample(node_class, model, positive, negative, base)
    assert latent["samples"].shape[0] == 2  # the photo's own row is not a frame of the story
    assert not torch.allclose(latent["samples"][0], plain["samples"][0])  # frames read the photo
    with pytest.raises(ValueError, match="Story Sampler: the story has a character photo.*Consistent"):
        _sample(node_class, model, positive, negative, plan)


def test_bad_routing_input_names_the_node_and_the_fix(node_class, tiny_sd15):
    _, clip, vae = tiny_sd15
    _, _, plan, _ = _prompt(node_class, clip)
    mask_node, routing_node = node_class("StoryKitCharacterMask"), node_class("StoryKitIdentityRouting")
    cases = [
        (lambda: mask_node.execute(story=plan, character="Zed", mask=torch.ones(1, 8, 8)), "Zed.*characters: Lena"),
        (lambda: mask_node.execute(story=plan, character="Bob", mask=torch.ones(1, 8, 8), frames="1"),
         "frame 1.*does not show \\[Bob\\]"),
        (lambda: mask_node.execute(story=plan, character="Bob", mask=torch.zeros(1, 8, 8)), "empty"),
        (lambda: mask_node.execute(story=plan, character="Bob", mask=torch.ones(3, 8, 8)), "3 masks for 2 frames"),
        (lambda: routing_node.execute(story=plan, mode="auto", background="share with background",
                                      layout="9: [Lena@left]"), "layout line 1.*outside the story"),
        (lambda: routing_node.execute(story=plan, mode="auto", background="share with background",
                                      layout="1: [Bob@left]"), "frame 1.*does not show \\[Bob\\]"),
        (lambda: routing_node.execute(story=plan, mode="auto", background="share with background",
                                      layout="3: [Bob@left-ish]"), "not a place"),
        (lambda: node_class("StoryKitCharacterPhoto").execute(story=plan, vae=vae, character="Lena",
                                                              image=torch.rand(2, 8, 8, 3), use="photo only",
                                                              mask=torch.ones(3, 8, 8)), "3 masks for 2 photos"),
    ]
    for run, match in cases:
        with pytest.raises(ValueError, match=match):
            run()


def test_mask_of_another_aspect_ratio_is_refused_at_sampling(node_class, tiny_sd15):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    plan = node_class("StoryKitCharacterMask").execute(story=plan, character="Bob", mask=torch.ones(1, 64, 32),
                                                       frames="3").result[0]
    with pytest.raises(ValueError, match="Character Mask.*another aspect ratio"):
        _sample(node_class, _csa(node_class, model.clone()), positive, negative, plan)


def test_boxes_on_flux_joint_attention(node_class, host, routed_calls):
    model, clip, _ = testmodels.tiny_models("flux", 0)
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = node_class("StoryKitConsistentSelfAttention").execute(
        model=model, sampling_rate=0.5, rate_per_level="", layers="decoder", start_percent=0.0, end_percent=1.0,
        skip_probability=0.0, seed=0, window_size=0, bank_precision="fp32", bank_location="cpu",
        blocks="").result[0]
    channels = model.model.latent_format.latent_channels
    _sample(node_class, patched, positive, negative, plan, size=8, channels=channels, cfg=1.0)
    meeting = [c for c in routed_calls if c["bank"] is not None]
    assert meeting
    for call in meeting:
        for labels in call["query"]:
            grid = _square(labels)  # 8x8 latent, patch 2: a 4x4 token grid
            assert grid.shape == (4, 4) and grid[:, :2].eq(1).all() and grid[:, 2:].eq(2).all()
