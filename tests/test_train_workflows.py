"""The training example workflows run headless end to end on the tiny models (tiny sizes, 2 steps)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def put_subject_pictures(host) -> None:
    for i in (1, 2, 3):
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[..., 2] = 200
        pixels[16 + 4 * i:40 + 4 * i, 20:44] = (230, 30, 30)
        Image.fromarray(pixels).save(host.base / "input" / f"storykit_hero_{i}.png")


def small(frames: list[int], latents: list[int]) -> list[str]:
    return [f"{n}.steps=2" for n in frames] + [f"{n}.{k}=64" for n in latents for k in ("width", "height")]


def test_textual_inversion_story_workflow(host, run_workflow):
    put_subject_pictures(host)
    result = run_workflow(WORKFLOWS / "storykit_train_ti.json", tiny_model="sd15", overrides=[
        "7.steps=2", "7.resolution=64", "7.save_every=0", *small([13, 18, 23], [12, 17, 22])])
    embedding = host.base / "models" / "embeddings" / "storykit_hero.safetensors"
    assert embedding.is_file()
    frames = sorted((host.base / "output" / "storykit").glob("story_frame*.png"))
    assert len(frames) >= 3
    assert result.ran >= {"7", "13", "18", "23"}


def test_dreambooth_story_workflow(host, run_workflow):
    put_subject_pictures(host)
    run_workflow(WORKFLOWS / "storykit_train_dreambooth.json", tiny_model="sd15", overrides=[
        "7.count=2", "9.steps=2", "9.resolution=64", "9.save_every=0", "9.num_class_images=1", "9.class_sample_steps=1",
        *small([15, 20, 25], [14, 19, 24])])
    lora = host.base / "models" / "loras" / "storykit_hero_dreambooth.safetensors"
    assert lora.is_file()
