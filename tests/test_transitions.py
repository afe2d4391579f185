"""Transitions on the real host: trajectories from a CLIP vision model, per-frame conditioning of Wan 2.1 and SVD."""
from __future__ import annotations

import pytest
import torch

from storykit.tests import transition_models as tm


@pytest.fixture(scope="module")
def mods(host):
    import comfy.sample
    import comfy.samplers
    import node_helpers

    from storykit.nodes import nodes_transitions as nt
    return nt, comfy.sample, comfy.samplers, node_helpers


def frames(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def text_conds():
    clip = tm.text_clip()
    def enc(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]
    return enc("a fox walks"), enc("blurry")


def host_output(node_class, node_id, **kw):
    """Run a node as the executor does: under inference mode (shared cached models may hold inference tensors)."""
    cls = node_class(node_id)
    with torch.inference_mode():
        out = cls.execute(**kw) if hasattr(cls, "execute") else getattr(cls(), cls.FUNCTION)(**kw)  # V3 or V1
    return out.result if hasattr(out, "result") else out


def sample(model, pos, neg, latent, steps=2, cfg=3.0, seed=0):
    import comfy.sample
    x = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(x, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, x, disable_pbar=True, seed=seed)


def wan_inputs(node_class, flf, length, image, cv_out, size=32):
    pos, neg = text_conds()
    if flf:
        return host_output(node_class, "WanFirstLastFrameToVideo", positive=pos, negative=neg, vae=tm.wan_vae(),
                           width=size, height=size, length=length, batch_size=1, start_image=image,
                           clip_vision_start_image=cv_out)
    return host_output(node_class, "WanImageToVideo", positive=pos, negative=neg, vae=tm.wan_vae(), width=size,
                       height=size, length=length, batch_size=1, start_image=image, clip_vision_output=cv_out)


# ---------------------------------------------------------------------------------------------- trajectory
def test_trajectory_node_endpoints_and_frame_times(mods, node_class):
    nt = mods[0]
    cv = tm.clip_vision()
    images = frames(3)
    (traj,) = host_output(node_class, "StoryKitSemanticTrajectory", clip_vision=cv, images=images, length=17,
                          layout="wan21", interpolation="spherical")
    assert len(traj.transitions) == 2 and traj.frames == 5 and traj.embedding == "penultimate_hidden_states"
    enc = cv.encode_image(images)["penultimate_hidden_states"]
    for i, tokens in enumerate(traj.transitions):
        assert tokens.shape == (5, 17, 1280)
        assert torch.equal(tokens[0], enc[i]) and torch.equal(tokens[-1], enc[i + 1])
    assert traj.spans == [(0, 0), (1, 4), (5, 8), (9, 12), (13, 16)]
    assert torch.allclose(traj.times, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    (svd,) = host_output(node_class, "StoryKitSemanticTrajectory", clip_vision=cv, images=images[:2], length=6,
                         layout="svd", interpolation="linear")
    assert svd.transitions[0].shape == (6, 1, 1024)
    assert torch.equal(svd.transitions[0][0, 0], cv.encode_image(images[:2])["image_embeds"][0])
    with pytest.raises(ValueError, match="4k\\+1"):
        nt.build_trajectory(cv, images, 16, "wan21", "linear", None)
    with pytest.raises(ValueError, match="at least 2"):
        nt.build_trajectory(cv, images[:1], 17, "wan21", "linear", None)


# ---------------------------------------------------------------------------------------------- Wan 2.1
@pytest.mark.parametrize("flf", [False, True], ids=["i2v", "flf"])
def test_wan_constant_trajectory_equals_native_image_conditioning(mods, node_class, flf):
    nt = mods[0]
    model = tm.wan(flf)
    image = frames(1, seed=3)
    cv_out = tm.clip_vision().encode_image(image)
    pos, neg, latent = wan_inputs(node_class, flf, 9, image, cv_out)
    native = sample(model, pos, neg, latent)
    tokens = cv_out["penultimate_hidden_states"][0].expand(3, -1, -1).clone()  # 9 frames -> 3 latent frames
    patched = sample(nt.patch_wan(model, tokens), pos, neg, latent)
    assert torch.isfinite(native).all()
    assert torch.equal(patched, native)
    # and the trajectory really is what the model attends to: another image changes the result
    other = tm.clip_vision().encode_image(frames(1, seed=4))["penultimate_hidden_states"][0]
    assert not torch.equal(sample(nt.patch_wan(model, other.expand(3, -1, -1).clone()), pos, neg, latent), native)


def _first_block_output(model, tokens, pos, neg, latent, nt):
    seen = {}

    def capture(args, extra):
        out = extra["original_block"](args)
        seen["img"] = out["img"].clone()
        return out

    m = nt.patch_wan(model, tokens)
    m.set_model_patch_replace(capture, "dit", "double_block", 0)
    sample(m, pos, neg, latent, steps=1, cfg=1.0)
    return seen["img"]


@pytest.mark.parametrize("flf,length,changed", [(False, 9, 1), (True, 129, 31)], ids=["i2v", "flf-past-514"])
def test_changing_frame_i_changes_only_latent_frame_i_after_the_first_block(mods, node_class, flf, length, changed):
    nt = mods[0]
    model = tm.wan(flf)
    cv = tm.clip_vision()
    ends = frames(2, seed=5)
    (traj,) = host_output(node_class, "StoryKitSemanticTrajectory", clip_vision=cv, images=ends, length=length,
                          layout="wan21", interpolation="linear")
    tokens = traj.transitions[0]
    size = 16 if length > 100 else 32
    pos, neg, latent = wan_inputs(node_class, flf, length, ends[:1], cv.encode_image(ends[:1]), size)
    f = tokens.shape[0]
    if flf:
        assert f * tokens.shape[1] > 514  # more image tokens than the FLF checkpoint's emb_pos holds at once
    base = _first_block_output(model, tokens, pos, neg, latent, nt)
    # a model left loaded (and patched) by the run before must not change the next run
    assert torch.equal(_first_block_output(model, tokens, pos, neg, latent, nt), base)
    moved = tokens.clone()
    moved[changed] = cv.encode_image(frames(1, seed=9))["penultimate_hidden_states"][0]
    out = _first_block_output(model, moved, pos, neg, latent, nt)
    per_frame = (out - base).abs().view(out.shape[0], f, -1).amax(dim=(0, 2))
    assert per_frame[changed] > 0
    assert torch.count_nonzero(per_frame) == 1, per_frame


def test_wan_patch_composes_and_leaves_the_input_model_alone(mods, node_class):
    nt = mods[0]
    model = tm.wan(False)
    image = frames(1, seed=3)
    cv_out = tm.clip_vision().encode_image(image)
    pos, neg, latent = wan_inputs(node_class, False, 9, image, cv_out)
    calls = []

    def other_pack(func, *args, **kwargs):  # someone else's attention override, already on the model
        calls.append(args[1].shape[1])
        return func(*args, **kwargs)

    base = model.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = other_pack
    tokens = cv_out["penultimate_hidden_states"][0].expand(3, -1, -1).clone()
    native = sample(model, pos, neg, latent)
    out = sample(nt.patch_wan(base, tokens), pos, neg, latent)
    assert torch.equal(out, native)
    # 2 steps x 2 blocks x (self, image, text) attention calls, the image one per frame inside ours
    assert len(calls) == 2 * 2 * 3 and 17 in calls
    assert "storykit_semantic_motion" not in str(model.model_options)
    assert model.get_model_object("diffusion_model.img_emb") is model.model.diffusion_model.img_emb


def test_length_mismatch_and_unsupported_models_name_the_fix(mods, node_class, tiny_sd15):
    nt = mods[0]
    with pytest.raises(ValueError, match="Wan 2.1 image-to-video.*Stable Video Diffusion"):
        nt.patch_wan(tiny_sd15[0], torch.zeros(3, 17, 1280))
    model = tm.wan(False)
    image = frames(1)
    pos, neg, latent = wan_inputs(node_class, False, 13, image, tm.clip_vision().encode_image(image))
    with pytest.raises(Exception, match="made for 3 latent frames"):
        sample(nt.patch_wan(model, torch.zeros(3, 17, 1280)), pos, neg, latent, steps=1)


# ---------------------------------------------------------------------------------------------- SVD
def test_svd_constant_trajectory_equals_native_conditioning(mods, node_class):
    from storykit.runner import testmodels
    nt = mods[0]
    cv = tm.clip_vision()
    vae = testmodels.tiny_models("sd15", 0)[2]
    image = frames(1, size=32, seed=2)
    pos, neg, latent = host_output(node_class, "SVD_img2vid_Conditioning", clip_vision=cv, init_image=image,
                                   vae=vae, width=32, height=32, video_frames=4, motion_bucket_id=127, fps=6,
                                   augmentation_level=0.0)
    model = tm.svd()
    native = sample(model, pos, neg, latent)
    embeds = cv.encode_image(image)["image_embeds"].view(1, 1, -1).expand(4, 1, -1).clone()
    traj = nt.SemanticTrajectory([embeds], torch.linspace(0, 1, 4), [(i, i) for i in range(4)], 4, "svd",
                                 "image_embeds")
    ours = host_output(node_class, "StoryKitSVDTransitionConditioning", trajectory=traj, init_image=image, vae=vae,
                       width=32, height=32, transition=0, motion_bucket_id=127, fps=6, augmentation_level=0.0)
    assert torch.isfinite(native).all()
    assert torch.equal(sample(model, ours[0], ours[1], ours[2]), native)
    moved = embeds.clone()
    moved[2] = cv.encode_image(frames(1, seed=8))["image_embeds"][0]
    traj.transitions = [moved]
    ours = host_output(node_class, "StoryKitSVDTransitionConditioning", trajectory=traj, init_image=image, vae=vae,
                       width=32, height=32, transition=0, motion_bucket_id=127, fps=6, augmentation_level=0.0)
    assert not torch.equal(sample(model, ours[0], ours[1], ours[2]), native)
