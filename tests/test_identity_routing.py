"""Automatic character masks of identity routing in the real host (CPU): the Story Prompt's description-token
positions per text encoder, and the text-to-image attention maps a CSA-patched tiny SD1.5 UNet (attn2 patch) and a
tiny FLUX (joint attention) hand to the story's Routing while sampling."""
from __future__ import annotations

import logging

import pytest
import torch

from storykit.kernels import identity_routing as ident
from storykit.runner import testmodels

STORY = """[Lena] a young woman with short red hair, green raincoat
[Bob] an old man with a white beard, flat cap
[Lena] reads a letter in the attic
[Bob] feeds pigeons in the park
[Lena] and [Bob] share an umbrella at the tram stop # They meet."""
SOLO = """[Lena] a young woman with short red hair, green raincoat
[Lena] reads a letter
[Lena] runs for the tram"""
TOKEN_KINDS = ["sd15", "sdxl", "flux", "chroma", "sd3", "qwen_image", "z_image"]


def _models(kind):
    return testmodels.tiny_models(kind, 0)


def _prompt(node_class, clip, story=STORY, style="Comic book"):
    return node_class("StoryKitStoryPrompt").execute(
        clip=clip, story=story, style=style, custom_style="", negative="blurry", references_per_character=1,
        reference_mode="auto").result


def _patch(model, rate=1.0):
    from storykit.nodes import csa_patch
    return csa_patch.patch_model(model, [rate], "decoder", 0.0, 1.0, 0.0, 7, 0, torch.float32, "cpu")


def _routing(plan, bounded=()):
    routing = ident.Routing(list(plan.characters))
    for frame in plan.frames:
        routing.add_frame(frame.index, frame.characters, bounded=frame.index in bounded,
                          tokens=plan.extras["tokens"].get(frame.index, {}))
    return routing


def _sample(model, positive, negative, plan, routing, channels, size=16, steps=3, cfg=3.0):
    """All frames of the plan in one batch through the host's sampler, with the story's routing attached."""
    import comfy.sample
    from storykit.nodes import csa_patch
    state = csa_patch.state_of(model)
    latent = torch.zeros(len(plan.frames), channels, size, size)
    noise = comfy.sample.prepare_noise(latent, 0)
    with state.story_run():
        state.routing = routing
        state.plan = [csa_patch.StoryFrame(f.index, frozenset(f.characters), f.reference) for f in plan.frames]
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0)


def _decode(clip, key, ids):
    from storykit.nodes import nodes_one_prompt_story as one_prompt
    return one_prompt._sub_tokenizer(clip.tokenizer, key).tokenizer.decode(ids)


def _squash(text):
    return "".join(text.lower().split())


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_description_positions_are_the_descriptions_tokens(kind, node_class, host):
    """Each frame's positions, read back through the host's tokenizer of each encoder on the conditioning's rows
    (SDXL: CLIP-L rows = CLIP-G rows; SD3.5: CLIP rows then T5 rows; Qwen-Image: its template head dropped),
    decode to exactly the character's description."""
    from storykit.nodes import nodes_one_prompt_story as one_prompt
    clip = _models(kind)[1]
    positive, _, plan, _ = _prompt(node_class, clip)
    tokens = plan.extras["tokens"]
    assert set(tokens) == {0, 1, 2} and set(tokens[2]) == {"Lena", "Bob"}
    toks = one_prompt.tokenizers(clip)
    encoder = one_prompt.encoder_of(toks)
    rows = positive[0][0].shape[1]
    for index, found in tokens.items():
        frame = plan.frames[index]
        host_tokens = clip.tokenize(frame.prompt, return_word_ids=True)
        keys = [k for k in encoder if k not in one_prompt.POOLED_ONLY.get(encoder, ())]
        flat = {k: [t[0] for batch in host_tokens[k] for t in batch] for k in keys}
        for name, positions in found.items():
            assert positions.dtype == torch.long and positions.max() < rows
            description = plan.characters[name]
            if kind == "sd3":  # CLIP-L/G on rows 0-76, T5 after them
                clip_rows, t5_rows = positions[positions < 77], positions[positions >= 77] - 77
                for key in ("l", "g"):
                    assert _squash(_decode(clip, key, [flat[key][p] for p in clip_rows])) == _squash(description)
                assert _squash(_decode(clip, "t5xxl", [flat["t5xxl"][p] for p in t5_rows])) == _squash(description)
                continue
            key = keys[-1] if kind != "sdxl" else "l"
            head = 0
            if kind == "qwen_image":  # the host drops its template up to the second <|im_start|> and "user\n"
                head = [i for i, t in enumerate(flat[key]) if t == 151644][1] + 3
            for k in (["l", "g"] if kind == "sdxl" else [key]):
                assert _squash(_decode(clip, k, [flat[k][p + head] for p in positions])) == _squash(description)


def _spy_rows(monkeypatch):
    """Every (call halves, row) the automatic masks project or read, and every map handed to a Routing."""
    from storykit.nodes import csa_patch
    seen, maps = [], []
    real_wanted, real_add = csa_patch.ConsistentSelfAttention.wanted_maps, ident.Routing.add_map

    def wanted(self, call):
        out = real_wanted(self, call)
        seen.extend((tuple(call.halves), row) for row, _, _ in out)
        return out

    def add_map(self, frame, character, map_):
        maps.append((frame, character, tuple(map_.shape)))
        return real_add(self, frame, character, map_)
    monkeypatch.setattr(csa_patch.ConsistentSelfAttention, "wanted_maps", wanted)
    monkeypatch.setattr(ident.Routing, "add_map", add_map)
    return seen, maps


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_two_character_frame_gets_automatic_masks_from_cond_rows(kind, node_class, monkeypatch, host):
    model, clip, _ = _models(kind)
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = _patch(model.clone())
    routing = _routing(plan)
    seen, maps = _spy_rows(monkeypatch)
    out = _sample(patched, positive, negative, plan, routing, model.model.latent_format.latent_channels)
    assert torch.isfinite(out).all()
    assert {(f, c) for f, c, _ in maps} == {(2, 1), (2, 2)}  # only the bounded (two-character) frame, both ids
    assert seen and all(any(half == 0 and rows.start <= row < rows.stop for half, rows in halves)
                        for halves, row in seen)  # the cond half only, whatever order the host stacked
    assert all(any(half == 1 for half, _ in halves) for halves, _ in seen)  # cfg 3: uncond rows were there
    grids = {shape for _, _, shape in maps}
    assert (8, 8) in grids
    for grid in grids:
        labels = routing.labels(2, grid)
        assert (labels == 1).any() and (labels == 2).any(), (grid, labels.view(grid))
        assert routing.labels(0, grid).eq(1).all() and routing.labels(1, grid).eq(2).all()


def test_uncond_rows_never_change_the_masks(node_class, tiny_sd15, host):
    """The same frame sampled at cfg 1 (cond only) and its first step at cfg 3: the maps of the first step come
    from the same cond rows, so the folded masks agree exactly."""
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    autos = []
    for cfg in (1.0, 3.0):
        routing = _routing(plan)
        _sample(_patch(model.clone()), positive, negative, plan, routing, 4, steps=2, cfg=cfg)
        autos.append({key: value.clone() for key, value in routing.auto.items()})
    assert autos[0].keys() == autos[1].keys() == {(2, 1), (2, 2)}
    for key in autos[0]:
        torch.testing.assert_close(autos[0][key], autos[1][key])


def test_single_character_story_is_bit_identical(node_class, tiny_sd15, host):
    """A story with one character per frame: its Routing bounds nothing (None for the sites), and the pictures
    equal those of a model without the automatic masks' attn2 patch, bit for bit."""
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, SOLO)
    assert set(plan.extras["tokens"]) == {0, 1}
    routing = _routing(plan)
    assert not routing.bounded()
    with_patch = _patch(model.clone())
    assert with_patch.model_options["transformer_options"]["patches"]["attn2_patch"]
    import comfy.patcher_extension
    from storykit.nodes import attention_sites
    without = _patch(model.clone())
    without.model_options["transformer_options"]["patches"].pop("attn2_patch")
    without.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, attention_sites.MAPS_WRAPPER_KEY)
    assert with_patch.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, attention_sites.MAPS_WRAPPER_KEY)
    a = _sample(with_patch, positive, negative, plan, routing, 4)
    b = _sample(without, positive, negative, plan, None, 4)
    assert torch.equal(a, b)
    assert not routing.auto
    for attn2 in with_patch.get_attachment("storykit_csa").site.cross.values():  # hooks live only inside a call
        assert not attn2.to_q._forward_hooks and not attn2.to_k._forward_hooks


def test_empty_automatic_mask_warns_and_shares_plainly(node_class, tiny_sd15, caplog, host):
    """A bounded frame (as a photo's is) whose character's description has no tokens: a warning naming the
    character, and plain sharing (the whole frame is hers). A flat map (no attention anywhere) does the same."""
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, SOLO)
    plan.extras["tokens"][0] = {"Lena": torch.zeros(0, dtype=torch.long)}
    routing = _routing(plan, bounded={0})
    with caplog.at_level(logging.WARNING, logger="storykit"):
        _sample(_patch(model.clone()), positive, negative, plan, routing, 4, steps=2)
    warned = [r.getMessage() for r in caplog.records if "automatic mask of Lena in frame 1 is empty" in r.getMessage()]
    assert len(warned) == 1 and "shares plainly" in warned[0]
    assert routing.labels(0, (8, 8)).eq(1).all()
    flat = ident.Routing(["Lena", "Bob"])
    flat.add_frame(0, ["Lena", "Bob"])
    flat.at_sigma(2.0)
    flat.add_map(0, 1, torch.ones(4, 4))
    flat.add_map(0, 2, ident.box_mask(ident.BOXES["right"], 4, 4))
    flat.at_sigma(1.0)
    with caplog.at_level(logging.WARNING, logger="storykit"):
        labels = flat.labels(0, (4, 4)).view(4, 4)
    assert any("automatic mask of Lena in frame 1 is empty" in r.getMessage() for r in caplog.records)
    assert labels[:, 2:].eq(2).all() and labels[:, :2].eq(1).all()  # Bob's half is his, the rest hers


def _story_sampler(node_class, model, positive, negative, plan, channels, size, cfg):
    latent = {"samples": torch.zeros(1, channels, size, size)}
    return node_class("StoryKitStorySampler").execute(
        model=model, positive=positive, negative=negative, story=plan, latent_image=latent, seed=3,
        seed_mode="same for all frames", steps=3, cfg=cfg, sampler_name="euler", scheduler="normal", batch_size=4,
        denoise=1.0).result


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_story_sampler_routes_the_meeting_frame_by_automatic_masks(kind, node_class, host):
    """Story Prompt -> Consistent Self-Attention -> Story Sampler, no places or masks: the meeting frame's routing
    picture shows both characters (from the description tokens' attention), the solo frames one each."""
    model, clip, _ = _models(kind)
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = node_class("StoryKitConsistentSelfAttention").execute(
        model=model.clone(), sampling_rate=0.5, rate_per_level="", layers="decoder", start_percent=0.0,
        end_percent=1.0, skip_probability=0.0, seed=0, window_size=0, bank_precision="fp32",
        bank_location="cpu").result[0]
    channels = model.model.latent_format.latent_channels
    latent, pictures = _story_sampler(node_class, patched, positive, negative, plan, channels, 16,
                                      1.0 if kind in ("flux", "z_image") else 4.0)
    assert torch.isfinite(latent["samples"]).all() and pictures.shape[0] == 3
    lena, bob = (torch.tensor(c) for c in ident.PALETTE[:2])

    def has(picture, colour):
        return bool(torch.isclose(picture, colour, atol=1e-4).all(-1).any())
    assert has(pictures[2], lena) and has(pictures[2], bob)
    assert torch.isclose(pictures[0], lena, atol=1e-4).all() and torch.isclose(pictures[1], bob, atol=1e-4).all()


@pytest.mark.parametrize("blank", [False, True])
def test_photo_without_mask_takes_an_automatic_mask_or_warns_and_shares_plainly(blank, node_class, tiny_sd15,
                                                                                 monkeypatch, caplog, host):
    """A Character Photo without a MASK: its mask comes from its description's attention (the bank gets Lena's
    and background labels); when the description has no tokens, a warning names the photo's character and the
    whole photo is shared as hers."""
    model, clip, vae = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, SOLO)
    if blank:
        plan.extras["tokens"][0] = {"Lena": torch.zeros(0, dtype=torch.long)}
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as the host's executor runs nodes
        plan = node_class("StoryKitCharacterPhoto").execute(story=plan, vae=vae, character="Lena", image=photo,
                                                            use="photo only", mask=None).result[0]
    patched = _patch(model.clone(), rate=0.5)
    state = patched.get_attachment("storykit_csa")
    writes = []
    real_write = state.bank.write
    monkeypatch.setattr(state.bank, "write", lambda *a, **kw: (writes.append((a[3], kw.get(
        "labels", a[5] if len(a) > 5 else None))), real_write(*a, **kw)))
    with caplog.at_level(logging.WARNING, logger="storykit"):
        _story_sampler(node_class, patched, positive, negative, plan, 4, 8, 4.0)
    warned = [r.getMessage() for r in caplog.records if "automatic mask of Lena in the photo of Lena" in r.getMessage()]
    assert {frame for frame, _ in writes} == {2}  # the photo row is the one reference
    labels = set().union(*(set(lab.tolist()) for _, lab in writes if lab is not None))
    if blank:
        assert len(warned) == 1 and "shares plainly" in warned[0]
        assert labels == {1, ident.UNKNOWN} or labels == {1}  # unknown before the step's fold, then all hers
    else:
        assert not warned and {0, 1} <= labels <= {1, 0, ident.UNKNOWN}  # hers and background


@pytest.mark.parametrize("kind", ["sdxl", "qwen_image", "z_image", "chroma", "sd3"])
def test_every_family_routes_the_meeting_frame_by_automatic_masks(kind, node_class, host):
    """Other families' sites (SDXL attn2; Qwen-Image's template-cut rows, Z-Image's padded caption, Chroma, SD3.5's
    register tokens and its [B, L, heads, D] values in joint attention) route the two-character frame by both
    characters' automatic masks."""
    test_story_sampler_routes_the_meeting_frame_by_automatic_masks(kind, node_class, host)
