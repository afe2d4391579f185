"""The predictor trainer, loader and saver on the real host (tiny CLIP vision, tiny predictor)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from storykit.tests import transition_models as tm


@pytest.fixture()
def predictor_dir(host, tmp_path):
    from storykit.nodes import nodes_transitions as nt
    folder = tmp_path / "storykit_predictors"
    folder.mkdir()
    host.folder_paths.add_model_folder_path(nt.PREDICTOR_FOLDER, str(folder), is_default=True)
    yield folder
    paths = host.folder_paths.folder_names_and_paths[nt.PREDICTOR_FOLDER][0]
    if str(folder) in paths:
        paths.remove(str(folder))


def eased_clips(count=6, frames=9, seed=0):
    """Clips that blend two random pictures with an eased (smoothstep) timing: the middle frames, and so their
    encodings, are a known function of the two ends."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, frames).view(-1, 1, 1, 1)
    s = t * t * (3 - 2 * t)
    clips = []
    for _ in range(count):
        a, b = torch.rand(2, 1, 28, 28, 3, generator=g)
        clips.append(a + s * (b - a))
    return torch.cat(clips)


def train(node_class, **kw):
    args = dict(clip_vision=tm.clip_vision(), steps=30, learning_rate=3e-3, batch_size=6, length=9, layout="svd",
                interpolation="linear", layers=2, hidden=64, heads=4, seed=0, checkpoint_every=10, name="t",
                clips=eased_clips(), clip_length=9)
    args.update(kw)
    return node_class("StoryKitTrainMotionPredictor").execute(**args).result


def test_trainer_lowers_the_loss_and_checkpoints(node_class, predictor_dir):
    with torch.inference_mode():  # as the executor runs nodes
        record, curve = train(node_class, steps=40)
    losses = record.losses
    assert len(losses) == 40 and record.step == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert curve.shape == (1, 256, 512, 3)
    assert sorted(p.name for p in predictor_dir.glob("*.safetensors")) == \
        [f"t_{s:05d}.safetensors" for s in (10, 20, 30, 40)]
    assert sorted(p.stem for p in predictor_dir.glob("*.trainstate")) == [f"t_{s:05d}" for s in (10, 20, 30, 40)]
    assert not record.model.training


def test_save_load_is_bit_identical_and_resume_continues(node_class, predictor_dir):
    with torch.inference_mode():
        record, _ = train(node_class, steps=5, checkpoint_every=0)
        node_class("StoryKitSaveMotionPredictor").execute(predictor=record, filename_prefix="mine")
        node_class("StoryKitSaveMotionPredictor").execute(predictor=record, filename_prefix="mine")
    assert {"mine_00001.safetensors", "mine_00002.safetensors", "t_00005.safetensors"} <= set(os.listdir(predictor_dir))
    (loaded,) = node_class("StoryKitLoadMotionPredictor").execute(predictor_name="mine_00001.safetensors").result
    for (k, v), (k2, v2) in zip(record.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.step == 5 and loaded.losses == record.losses
    with torch.inference_mode():
        again, _ = train(node_class, steps=3, checkpoint_every=0, predictor=loaded)
    assert again.step == 8 and len(again.losses) == 8
    assert torch.equal(loaded.model.state_dict()["proj_in.weight"], record.model.state_dict()["proj_in.weight"])
    # a trained predictor drives the trajectory node
    frames = eased_clips(1)[[0, -1]]
    with torch.inference_mode():
        (traj,) = node_class("StoryKitSemanticTrajectory").execute(
            clip_vision=tm.clip_vision(), images=frames, length=9, layout="svd", interpolation="linear",
            predictor=again).result
    assert traj.method == "linear + predictor" and traj.transitions[0].shape == (9, 1, 1024)


def test_cancel_keeps_the_last_checkpoint(node_class, predictor_dir, cancel_at_progress):
    import comfy.model_management as mm
    from storykit.kernels import semantic_motion as smp
    cancel_at_progress(12)  # the host's hook raises in the progress update after step 12
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        train(node_class, steps=30, checkpoint_every=5)
    names = sorted(p.name for p in predictor_dir.glob("*.safetensors"))
    assert names == ["t_00005.safetensors", "t_00010.safetensors", "t_00012.safetensors"]
    net, meta = smp.load_predictor(str(predictor_dir / names[-1]))
    assert meta["step"] == 12 and len(meta["losses"]) == 12
    assert not [n for n in names if ".tmp" in n]


@pytest.fixture()
def input_folder(host, tmp_path):
    """A fresh folder inside the host's input folder, by name, as a user gives it."""
    import shutil
    folder = Path(host.folder_paths.get_input_directory()) / f"clips_{tmp_path.name}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder)


def test_trainer_errors_name_the_fix(node_class, predictor_dir, input_folder, tmp_path):
    with pytest.raises(ValueError, match="no training clips"):
        train(node_class, clips=None)
    with pytest.raises(ValueError, match="no clips in"):
        train(node_class, clips=None, folder=input_folder.name)


@pytest.mark.parametrize("where", ["outside", "dotdot", "missing"])
def test_trainer_reads_clips_only_from_the_input_folder(node_class, predictor_dir, input_folder, tmp_path, where):
    """One message whether the folder is elsewhere on the machine or not there at all."""
    (tmp_path / "a").mkdir()
    folder = {"outside": str(tmp_path), "dotdot": f"{input_folder.name}/../../{tmp_path.name}",
              "missing": "no_such_clips"}[where]
    with pytest.raises(ValueError, match=r"is not a folder in ComfyUI's input folder .*put the videos"):
        train(node_class, clips=None, folder=folder)


def test_trainer_reads_a_folder_of_videos_and_frame_folders(node_class, predictor_dir, input_folder):
    import av
    import numpy as np
    from PIL import Image
    data = input_folder
    (data / "shot_a").mkdir(parents=True)
    for i, frame in enumerate(eased_clips(1, frames=9, seed=3)):
        Image.fromarray((frame.numpy() * 255).astype(np.uint8)).save(data / "shot_a" / f"{i:04d}.png")
    container = av.open(str(data / "shot_b.mp4"), "w")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
    for frame in eased_clips(1, frames=12, seed=4):
        big = torch.nn.functional.interpolate(frame.permute(2, 0, 1)[None], size=(360, 640))[0].permute(1, 2, 0)
        for packet in stream.encode(av.VideoFrame.from_ndarray((big.numpy() * 255).astype(np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    from storykit.nodes import nodes_transitions as nt
    clips = nt.read_clip_folder(str(data), "test")
    assert [c.shape for c in clips] == [(12, 256, 455, 3), (9, 28, 28, 3)]  # video kept small, uint8
    assert all(c.dtype == torch.uint8 for c in clips)
    with torch.inference_mode():
        record, _ = train(node_class, clips=None, folder=str(data), steps=2, checkpoint_every=0)
    assert record.step == 2


def test_a_wan_predictor_drives_the_wan_patch(node_class, predictor_dir):
    """Train on ViT tokens (layout wan21), predict a trajectory with it, and sample a patched tiny Wan."""
    from storykit.nodes import nodes_transitions as nt
    from storykit.tests.test_transitions import sample, wan_inputs
    cv = tm.clip_vision()
    with torch.inference_mode():
        record, _ = train(node_class, layout="wan21", steps=3, checkpoint_every=0, batch_size=2)
        assert (record.model.config.tokens, record.model.config.embed_dim) == (17, 1280)
        ends = eased_clips(1, seed=7)[[0, -1]]
        (traj,) = node_class("StoryKitSemanticTrajectory").execute(
            clip_vision=cv, images=ends, length=9, layout="wan21", interpolation="spherical",
            predictor=record).result
        plain = nt.build_trajectory(cv, ends, 9, "wan21", "spherical", None)
        assert traj.transitions[0].shape == (3, 17, 1280)
        assert not torch.equal(traj.transitions[0], plain.transitions[0])  # the trained predictor moved the path
        (model,) = node_class("StoryKitWanSemanticMotion").execute(model=tm.wan(False), trajectory=traj,
                                                                   transition=0).result
        pos, neg, latent = wan_inputs(node_class, False, 9, ends[:1], cv.encode_image(ends[:1]))
        assert torch.isfinite(sample(model, pos, neg, latent, steps=1)).all()
    with pytest.raises(ValueError, match="transition 1 does not exist"):
        node_class("StoryKitWanSemanticMotion").execute(model=tm.wan(False), trajectory=traj, transition=1)


def test_resume_after_cancel_ends_where_the_uninterrupted_run_ends(node_class, predictor_dir, cancel_at_progress):
    """Cancel after step 12 of 30 (the host's hook), load that checkpoint, train the other 18: the same weights and
    losses as 30 steps straight (same draws per step, the optimizer's moments saved beside the checkpoint)."""
    import comfy.model_management as mm
    import comfy.utils
    with torch.inference_mode():
        straight, _ = train(node_class, steps=30, checkpoint_every=0, name="straight")
    cancel_at_progress(12)
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        train(node_class, steps=30, checkpoint_every=0, name="cut")
    comfy.utils.set_progress_bar_global_hook(None)
    mm.interrupt_current_processing(False)
    assert (predictor_dir / "cut_00012.trainstate").is_file()
    (loaded,) = node_class("StoryKitLoadMotionPredictor").execute(predictor_name="cut_00012.safetensors").result
    with torch.inference_mode():
        resumed, _ = train(node_class, steps=18, checkpoint_every=0, name="resumed", predictor=loaded)
    assert resumed.step == 30 and resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for (k, v), (_, w) in zip(resumed.model.state_dict().items(), straight.model.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
