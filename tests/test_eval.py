"""Consistency metrics on real photographs and random-weight encoders of the real layouts, `storykit eval` end to end
on frames the runner wrote, the Story Consistency Score node and its workflow, and the ConsiStory+ conversion."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from storykit.tests.eval_fixtures import (face_photos, random_clip_l_text, random_clip_vision_l, tiny_clip_dir,
                                          tiny_vit_dir)
from PIL import Image

PACK_DIR = Path(__file__).resolve().parents[1]


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


@pytest.fixture(scope="session")
def em(host):
    from storykit.nodes import eval_models
    return eval_models


@pytest.fixture(scope="session")
def model_dirs(host):
    """Tiny CLIP / DINOv2 / DreamSim-ViT folders placed in the host's model folders, where 'auto' finds them."""
    from storykit.runner.cli import cache_dir
    root = cache_dir() / "eval-test-models"
    models = host.base / "models"
    placed = {}
    for kind, folder, src in (("clip", "clip_vision", tiny_clip_dir(root)), ("dino", "dinov2", tiny_vit_dir(root, "dinov2")),
                              ("dreamsim", "dreamsim", tiny_vit_dir(root, "vit"))):
        dst = models / folder / src.name
        if not dst.exists():
            shutil.copytree(src, dst)
        placed[kind] = dst
    return placed


@pytest.fixture(scope="session")
def photos():
    return {name: _load(path) for name, path in face_photos().items()}


# --------------------------------------------------------------------------------------------- face identity
def test_face_metric_tells_people_apart_on_real_photographs(em, photos):
    face = em.FaceModel()
    obama, obama2, obama3, biden = (face.descriptor(photos[n]) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg",
                                                                          "biden.jpg"))
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    for a, b in ((obama, obama2), (obama, obama3), (obama2, obama3)):
        assert dist(a, b) < em.FACE_THRESHOLD
    for other in (obama, obama2, obama3):
        assert dist(other, biden) > em.FACE_THRESHOLD
    flipped = face.descriptor(photos["obama.jpg"].flip(1))
    h, w = photos["obama2.jpg"].shape[:2]
    cropped = face.descriptor(photos["obama2.jpg"][h // 10: h - h // 10, w // 10: w - w // 10])
    assert dist(flipped, obama) < em.FACE_THRESHOLD and dist(cropped, obama) < em.FACE_THRESHOLD
    assert dist(flipped, biden) > em.FACE_THRESHOLD


def test_face_scores_per_story_and_no_face_is_a_note_not_a_crash(em, photos):
    models = em.Models(face=em.FaceModel())
    frames = [photos["obama.jpg"], photos["obama2.jpg"], torch.full((300, 300, 3), 0.5), photos["biden.jpg"]]
    result = em.score_story(models, frames)
    assert result["faces_found"] == [True, True, False, True]
    assert "no face found in frame 3" in " ".join(result["notes"])
    assert result["metrics"]["face_same"]["n"] == 3 and result["metrics"]["face_same"]["mean"] == pytest.approx(1 / 3)
    lone = em.score_story(models, [photos["obama.jpg"]])
    assert "one frame" in lone["notes"][0] and "face_distance" not in lone["metrics"]


# --------------------------------------------------------------------------------------------- encoders
def _check_pair_matrix(encoder, frames):
    from storykit.kernels import consistency as cons
    m = cons.cosine_matrix(encoder.features(frames))
    assert torch.allclose(m.diagonal(), torch.ones(len(frames)), atol=1e-5)
    assert torch.allclose(m, m.T, atol=1e-6)
    perm = [2, 0, 3, 1]
    pm = cons.cosine_matrix(encoder.features(torch.stack([frames[i] for i in perm])))
    assert torch.allclose(pm, m[perm][:, perm], atol=1e-5)
    assert (m - torch.eye(len(frames))).abs().max() > 1e-4  # different frames are not all the same vector


def _frames(seed=0, n=4, size=96):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


@pytest.mark.parametrize("kind", ["clip", "dino", "dreamsim"])
def test_encoders_found_automatically_in_the_model_folders(em, model_dirs, kind):
    encoder = em.load_encoder(kind)
    assert str(model_dirs[kind]) in encoder.source
    _check_pair_matrix(encoder, _frames())


def test_clip_t_matches_each_frame_with_its_own_prompt(em, model_dirs):
    from storykit.kernels import consistency as cons
    models = em.Models(clip=em.load_encoder("clip", str(model_dirs["clip"])))
    frames = _frames(1)
    prompts = ["a red fox in the snow", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen"]
    scores = torch.tensor(em.score_story(models, frames, prompts)["clip_t_per_frame"])
    full = cons.clip_score(models.clip.features(frames)[:, None].expand(-1, 4, -1),
                           models.clip.encode_text(prompts)[None].expand(4, -1, -1))
    assert torch.allclose(scores, full.diagonal(), atol=1e-5)
    perm = [3, 1, 0, 2]
    swapped = em.score_story(models, frames[perm], [prompts[i] for i in perm])["clip_t_per_frame"]
    assert torch.allclose(torch.tensor(swapped), scores[perm], atol=1e-5)
    with pytest.raises(ValueError, match="one prompt per frame"):
        em.score_story(models, frames, prompts[:3])


def test_features_are_computed_once_per_frame(em, model_dirs):
    encoder = em.load_encoder("dino", str(model_dirs["dino"]))
    calls = []
    inner = encoder.encode
    encoder.encode = lambda x: calls.append(x.shape[0]) or inner(x)
    frames = _frames(2)
    encoder.features(frames)
    encoder.features(torch.cat([frames, frames[:2]]))
    assert sum(calls) == 4


def test_masks_change_identity_scores_but_not_clip_t(em, model_dirs):
    models = em.Models(clip=em.load_encoder("clip", str(model_dirs["clip"])))
    frames, prompts = _frames(3), ["a", "b", "c", "d"]
    masks = torch.zeros(4, 96, 96)
    masks[:, 24:72, 24:72] = 1.0
    plain, masked = em.score_story(models, frames, prompts), em.score_story(models, frames, prompts, masks)
    assert masked["masks"] == "given" and plain["masks"] == "none"
    assert masked["metrics"]["clip_i"]["mean"] != pytest.approx(plain["metrics"]["clip_i"]["mean"])
    assert masked["clip_t_per_frame"] == pytest.approx(plain["clip_t_per_frame"])


def test_host_clip_vision_loader_on_a_full_size_random_vit_l(em, host):
    from storykit.runner.cli import cache_dir
    root = cache_dir() / "eval-test-models"
    path = random_clip_vision_l(root)
    encoder = em.load_encoder("clip", str(path), str(random_clip_l_text(root, projection=False)))
    assert "comfy.clip_vision" in encoder.source and encoder.encode_text is None
    _check_pair_matrix(encoder, _frames(4, size=64))
    result = em.score_story(em.Models(clip=encoder), _frames(4, size=64), ["a", "b", "c", "d"])
    assert "clip_i" in result["metrics"] and "no CLIP text encoder with a 768-wide" in " ".join(result["notes"])


def test_host_clip_vision_with_the_host_text_encoder_for_clip_t(em, host):
    from storykit.kernels import consistency as cons
    from storykit.runner.cli import cache_dir
    root = cache_dir() / "eval-test-models"
    vision, text = random_clip_vision_l(root), random_clip_l_text(root)
    (host.base / "models" / "text_encoders").mkdir(parents=True, exist_ok=True)
    placed = host.base / "models" / "text_encoders" / text.name
    if not placed.exists():
        placed.symlink_to(text)
    encoder = em.load_encoder("clip", str(vision))  # the text side found in models/text_encoders
    assert "comfy.sd.load_clip" in encoder.source and text.name in encoder.source
    frames = _frames(5, size=64)
    prompts = ["a red fox in the snow", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen"]
    texts = encoder.encode_text(prompts)
    assert texts.shape == (4, 768) and not torch.allclose(texts[0], texts[1])
    models = em.Models(clip=encoder)
    scores = torch.tensor(em.score_story(models, frames, prompts)["clip_t_per_frame"])
    cos = torch.nn.functional.cosine_similarity(encoder.features(frames)[:, None], texts[None], dim=-1)
    assert torch.allclose(scores, cons.CLIPSCORE_WEIGHT * cos.diagonal().clamp(min=0), atol=1e-5)
    perm = [1, 3, 0, 2]
    swapped = em.score_story(models, frames[perm], [prompts[i] for i in perm])["clip_t_per_frame"]
    assert torch.allclose(torch.tensor(swapped), scores[perm], atol=1e-5)
    with pytest.raises(em.ModelMissing, match="lacks the projection"):
        em.find_text_encoder(768, str(random_clip_l_text(root, projection=False)))


def test_a_missing_model_names_where_it_looked_and_the_rest_still_runs(em, tmp_path, photos):
    models = em.load_models({"clip": str(tmp_path / "nope"), "dino": str(tmp_path), "dreamsim": "none"})
    assert models.clip is None and models.dino is None and models.face is not None
    assert str(tmp_path / "nope") in models.missing["clip"] and "transformers folder" in models.missing["clip"]
    assert "nothing is downloaded" in models.missing["dino"]
    result = em.score_story(models, [photos["obama.jpg"], photos["obama2.jpg"]])
    assert result["metrics"]["face_same"]["mean"] == 1.0


# --------------------------------------------------------------------------------------------- eval CLI
@pytest.fixture(scope="session")
def runner_frames(host, tmp_path_factory):
    """A story the runner wrote: the CSA workflow on the tiny SD1.5 model, frames and comic page in one folder."""
    from storykit.runner import cli
    out = tmp_path_factory.mktemp("runner-out")
    try:
        rc = cli.main(["run", str(PACK_DIR / "workflows" / "storykit_csa_sd15.json"), "--tiny-model", "sd15",
                       "--output", str(out), "--quiet", "--set", "4.width=64", "--set", "4.height=64",
                       "--set", "5.steps=2"])
    finally:
        host.folder_paths.set_output_directory(str(host.base / "output"))
    assert rc == 0
    return out


def _eval(args, capsys):
    from storykit.runner import cli
    rc = cli.main(["eval", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_eval_end_to_end_on_the_runners_frames(runner_frames, model_dirs, capsys, tmp_path):
    reports = tmp_path / "reports"
    rc, out, err = _eval([str(runner_frames), "--out", str(reports)], capsys)
    assert rc == 0, err
    assert "1Prompt1Story (1P1S Table 1)" in out and "0.8942" in out and "| this run" in out
    folder = reports / "eval_00001"
    report = json.loads((folder / "report.json").read_text())
    (story,) = report["stories"]  # the comic page is another output of the same run, not a story
    assert story["id"] == "storykit_csa_sd15" and len(story["files"]) == 5
    assert story["prompts"][0].startswith("children's storybook illustration, a young woman with short red hair")
    assert set(story["metrics"]) >= {"clip_t", "clip_i", "dino", "dreamsim"}
    assert set(report["models"]) == {"clip", "dino", "dreamsim", "face"}
    rows = list(csv.DictReader((folder / "report.csv").open()))
    assert rows[0]["story_id"] == "storykit_csa_sd15" and float(rows[0]["clip_i"]) == pytest.approx(
        story["metrics"]["clip_i"]["mean"], abs=1e-5)
    page = (folder / "report.html").read_text()
    assert page.count("<figure>") == 5 and "storykit_csa_sd15" in page
    assert f"{story['metrics']['clip_i']['mean']:.4f}" in page
    first = (folder / "report.json").read_bytes()
    assert _eval([str(runner_frames), "--out", str(reports)], capsys)[0] == 0
    assert (reports / "eval_00002" / "report.html").is_file() and (folder / "report.json").read_bytes() == first


def test_eval_reads_a_batch_manifest_worst_story_first(runner_frames, model_dirs, capsys, tmp_path):
    frames = sorted(runner_frames.glob("storykit_csa_sd15_0*.png"))
    batch = tmp_path / "batch"
    for story, picks in (("alike", [0, 0, 0]), ("mixed", [0, 2, 4])):
        (batch / story).mkdir(parents=True)
        for i, n in enumerate(picks):
            shutil.copy(frames[n], batch / story / f"{i}.png")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(batch / "mixed" / "2.png")
    rows = [{"story_id": s, "workflow_hash": "abc", "seeds": [1], "settings": {}, "files": [f"{s}/{i}.png" for i in
             range(3)], "prompts": [f"{s} {i}" for i in range(3)], "seconds": 1.0, "status": "done", "error": None}
            for s in ("alike", "mixed")]
    # the batch runner lists a story's comic page too, with no prompt: it is not a frame
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(batch / "alike" / "page.png")
    rows[0]["files"].append("alike/page.png")
    rows[0]["prompts"].append(None)
    rows.append({"story_id": "broken", "workflow_hash": "abc", "seeds": [2], "settings": {}, "files": [],
                 "seconds": 0.5, "status": "failed", "error": "out of memory"})
    rows.append({"story_id": "moved", "workflow_hash": "abc", "seeds": [3], "settings": {}, "files": ["gone.png"],
                 "seconds": 0.5, "status": "done", "error": None})
    (batch / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, out, err = _eval([str(batch / "manifest.jsonl"), "--dreamsim", "none", "--face", "none"], capsys)
    assert rc == 0, err
    report = json.loads((batch / "storykit-eval" / "eval_00001" / "report.json").read_text())
    assert [s["id"] for s in report["stories"]] == ["broken", "moved", "mixed", "alike"]
    assert "gone.png: no such file" in report["stories"][1]["error"]
    assert report["stories"][3]["prompts"] == ["alike 0", "alike 1", "alike 2"]
    assert not any("page.png" in f for f in report["stories"][3]["files"])
    assert report["stories"][3]["metrics"]["clip_i"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert "out of memory" in (batch / "storykit-eval" / "eval_00001" / "report.html").read_text()
    assert "dreamsim" in report["missing"] and report["summary"]["clip_i"]["n"] == 2


def test_eval_bad_input_gives_clear_messages(runner_frames, model_dirs, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _eval([str(empty)], capsys)
    assert rc == 2 and "no frames here" in err
    stories = tmp_path / "stories"
    frames = sorted(runner_frames.glob("storykit_csa_sd15_0*.png"))
    (stories / "single").mkdir(parents=True)
    shutil.copy(frames[0], stories / "single" / "a.png")
    (stories / "corrupt").mkdir()
    shutil.copy(frames[0], stories / "corrupt" / "a.png")
    (stories / "corrupt" / "b.png").write_bytes(frames[1].read_bytes()[:200])
    (stories / "order").mkdir()
    for n in (10, 2, 1):
        shutil.copy(frames[0], stories / "order" / f"frame_{n}.png")
    (stories / "sizes").mkdir()
    shutil.copy(frames[0], stories / "sizes" / "a.png")
    Image.open(frames[1]).resize((96, 80)).save(stories / "sizes" / "b.png")
    rc, _, err = _eval([str(stories), "--face", "none"], capsys)
    assert rc == 0, err
    report = json.loads((stories / "storykit-eval" / "eval_00001" / "report.json").read_text())
    by_id = {s["id"]: s for s in report["stories"]}
    assert [Path(f).name for f in by_id["order"]["files"]] == ["frame_1.png", "frame_2.png", "frame_10.png"]
    assert by_id["corrupt"]["status"] == "error" and "cannot read this image" in by_id["corrupt"]["error"]
    assert "one frame" in " ".join(by_id["single"]["notes"]) and "clip_i" not in by_id["single"]["metrics"]
    assert "different sizes" in " ".join(by_id["sizes"]["notes"]) and "clip_i" in by_id["sizes"]["metrics"]


# --------------------------------------------------------------------------------------------- node + workflow
def test_story_consistency_node_in_the_shipped_workflow(run_workflow, model_dirs):
    workflow = PACK_DIR / "workflows" / "storykit_eval_story.json"
    result = run_workflow(workflow, overrides=["4.width=64", "4.height=64", "5.steps=2"])
    assert "11" in result.ran
    summary = "".join(result.outputs["12"]["text"])
    for label in ("CLIP-T", "CLIP-I", "DINO", "DreamSim"):
        assert f"{label}:" in summary
    assert "no face found" in summary
    assert result.outputs["13"]["images"]


def _letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    """Fit a photograph into a size x size grey square without changing its shape (one IMAGE batch needs one size)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    small = torch.nn.functional.interpolate(image.movedim(-1, 0)[None], size=(round(h * scale), round(w * scale)),
                                            mode="bilinear", antialias=True)[0].movedim(0, -1)
    canvas = torch.full((size, size, 3), 0.5)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas


def test_story_consistency_node_scores_and_draws_the_pair_matrix(node_class, model_dirs, photos):
    node = node_class("StoryKitConsistencyScore")
    frames = torch.stack([_letterbox(photos[n], 400) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")])
    out = node.execute(frames, "auto", "auto", "auto", "none", "auto", prompts="a\nb\nc").result
    scores = json.loads(out[0])
    assert scores["faces_found"] == [True, True, True]
    assert scores["metrics"]["face_same"]["mean"] == pytest.approx(1 / 3)
    assert "dreamsim" in scores["missing"] and "CLIP-T:" in out[1]
    assert out[2].shape[0] == 1 and out[2].shape[-1] == 3 and out[2].shape[2] > out[2].shape[1]
    with pytest.raises(ValueError, match="3 frames"):
        node.execute(frames, "auto", "auto", "auto", "none", "auto", prompts="a\nb")


# --------------------------------------------------------------------------------------------- ConsiStory+
def test_consistory_plus_round_trips_all_192_sets(tmp_path):
    from storykit.runner import consistory
    sets, stories = consistory.load_sets(), consistory.convert()
    assert len(stories) == 192 and sum(len(s["frame_prompts"]) for s in stories) == 1100
    assert len({s["id"] for s in stories}) == 192
    for entry, story in zip(sets, stories, strict=True):
        back = consistory.from_story(story)
        assert back == {"concept_token": entry["concept_token"], "style": " ".join(str(entry["style"]).split()),
                        "subject": " ".join(entry["subject"].split()), "settings": [" ".join(s.split()) for s in
                                                                                    entry["settings"]]}
    out = consistory.write_stories(tmp_path / "stories.yaml")
    again = consistory.write_stories(tmp_path / "stories.yaml")
    assert again != out and out.read_text() == again.read_text()
    import yaml
    assert yaml.safe_load(out.read_text())[0] == stories[0]
    assert (PACK_DIR / "data" / "LICENSE-consistory_plus.txt").read_text().count("FoundationVision") == 1
