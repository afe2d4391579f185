"""The shipped transition workflows run headless through the real executor, on tiny random-weight Wan / SVD models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storykit.tests import transition_models as tm

REPO = Path(__file__).resolve().parents[1]


def _loader(name, returns, build):
    """A test-only loader node (V1 style) that hands out a tiny model instead of reading a file."""
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: {"required": {}}), "RETURN_TYPES": returns,
                           "FUNCTION": "load", "CATEGORY": "testing", "load": lambda self: build()})


@pytest.fixture(scope="module")
def tiny_loaders(host):
    from storykit.runner import testmodels
    loaders = {
        "UNETLoader": _loader("TransitionsTestWanFLF", ("MODEL",), lambda: (tm.wan(True),)),
        "CLIPLoader": _loader("TransitionsTestWanText", ("CLIP",), lambda: (tm.text_clip(),)),
        "VAELoader": _loader("TransitionsTestWanVAE", ("VAE",), lambda: (tm.wan_vae(),)),
        "CLIPVisionLoader": _loader("TransitionsTestClipVision", ("CLIP_VISION",), lambda: (tm.clip_vision(),)),
        "ImageOnlyCheckpointLoader": _loader(
            "TransitionsTestSVD", ("MODEL", "CLIP_VISION", "VAE"),
            lambda: (tm.svd(), tm.clip_vision(), testmodels.tiny_models("sd15", 0)[2])),
    }
    for cls in loaders.values():
        host.nodes.NODE_CLASS_MAPPINGS[cls.__name__] = cls
    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(host.base / "input" / f"story_frame_{i + 1}.png")
    yield loaders
    for cls in loaders.values():  # test-only nodes leave with this module
        host.nodes.NODE_CLASS_MAPPINGS.pop(cls.__name__, None)


def _api(host, name, loaders):
    from storykit.runner import convert as conv
    data = conv.load_workflow_file(REPO / "workflows" / name)
    prompt = conv.to_api(data, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    for entry in prompt.values():
        if entry["class_type"] in loaders:
            entry["class_type"] = loaders[entry["class_type"]].__name__
            entry["inputs"] = {}
    return prompt


def _find(prompt, class_type):
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


@pytest.mark.parametrize("name,length,size", [("storykit_transitions_wan.json", 9, 32),
                                              ("storykit_transitions_svd.json", 4, 32)])
def test_transition_workflow_runs_headless(host, run_workflow, tiny_loaders, name, length, size):
    prompt = _api(host, name, tiny_loaders)
    traj, video, save = (_find(prompt, c) for c in ("StoryKitSemanticTrajectory", "StoryKitStoryToVideo",
                                                      "SaveAnimatedWEBP"))
    result = run_workflow(prompt, tiny_model=None, overrides=[
        f"{traj}.length={length}", f"{video}.width={size}", f"{video}.height={size}", f"{video}.steps=2"])
    images = result.outputs[save]["images"]
    assert images and (host.base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


def test_story_to_video_joins_n_minus_1_transitions(host, node_class, tiny_loaders):
    import comfy.utils
    frames = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    cv = tm.clip_vision()
    clip = tm.text_clip()
    pos = [[clip.encode_from_tokens(clip.tokenize("a fox"), return_pooled=True)[0], {}]]
    neg = [[clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)[0], {}]]
    seen = []
    hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: seen.append((value, total)))
    try:
        with torch.inference_mode():
            (traj,) = node_class("StoryKitSemanticTrajectory").execute(
                clip_vision=cv, images=frames, length=9, layout="wan21", interpolation="linear").result
            (video,) = node_class("StoryKitStoryToVideo").execute(
                model=tm.wan(True), vae=tm.wan_vae(), trajectory=traj, images=frames, width=32, height=32, seed=0,
                steps=2, cfg=3.0, sampler_name="euler", scheduler="simple", positive=pos, negative=neg).result
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
    assert video.shape == (2 * 8 + 1, 32, 32, 3) and torch.isfinite(video).all()
    assert {t for _, t in seen} == {4} and seen[-1] == (4, 4)  # one bar over both transitions
    with pytest.raises(ValueError, match="layout to svd"):
        node_class("StoryKitStoryToVideo").execute(
            model=tm.svd(), vae=tm.wan_vae(), trajectory=traj, images=frames, width=32, height=32, seed=0, steps=1,
            cfg=1.0, sampler_name="euler", scheduler="simple")
