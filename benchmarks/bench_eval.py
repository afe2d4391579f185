"""Consistency-metric speed on this machine: frames scored per second per metric, and the whole ConsiStory+ set's
estimated evaluation time.

Models are random-weight copies at the real sizes (CLIP ViT-L/14 as a transformers folder, DINOv2-base, DreamSim's
DINO ViT-B/16), written once into the StoryKit cache and loaded through the same loaders `storykit eval` uses; the
face metric is dlib's real model. Speed does not depend on the weights' values. Each metric encodes fresh frames
(its feature cache emptied) and is timed by wall clock; the pair matrices come from those cached features, so a
second pass over the same frames costs nothing, which is measured too.

    bash tools/storykit.sh python benchmarks/bench_eval.py [--frames 8] [--size 1024]
"""
from __future__ import annotations

import argparse
import time

import torch
from measure import say  # benchmarks/ is on sys.path

CONSISTORY_FRAMES, CONSISTORY_STORIES = 1100, 192


def build(folder, kind):
    import transformers

    from storykit.tests.eval_fixtures import write_clip_dir
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    if kind == "clip":  # openai/clip-vit-large-patch14's shape
        config = transformers.CLIPConfig(
            text_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "vocab_size": 49408},
            vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
            projection_dim=768)
        return write_clip_dir(folder, config)
    elif kind == "dino":  # facebook/dinov2-base
        model = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12,
                                                                   num_attention_heads=12, image_size=518,
                                                                   patch_size=14))
    else:  # DreamSim's single-branch DINO ViT-B/16
        model = transformers.ViTModel(transformers.ViTConfig(hidden_size=768, num_hidden_layers=12,
                                                             num_attention_heads=12, intermediate_size=3072,
                                                             image_size=224, patch_size=16), add_pooling_layer=False)
    model.save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames per timing (default 8)")
    parser.add_argument("--size", type=int, default=1024, help="frame side in pixels (SDXL: 1024)")
    args = parser.parse_args()
    from storykit.runner import host
    host.boot(cpu=not torch.cuda.is_available())
    from storykit.nodes import eval_models as em
    from storykit.runner.cli import cache_dir
    root = cache_dir() / "bench-eval-models"
    threads = torch.get_num_threads()
    say(f"device: {'cuda' if torch.cuda.is_available() else f'cpu ({threads} threads)'}, {args.frames} frames of "
        f"{args.size} x {args.size}")
    frames = torch.rand(args.frames, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["A fiery and majestic illustration of A phoenix with bright orange feathers soaring through a "
               "glowing sky"] * args.frames
    rates = {}
    for kind, label in (("clip", "CLIP ViT-L/14 image (CLIP-I; CLIP-T's image side)"), ("dino", "DINOv2-base"),
                        ("dreamsim", "DreamSim ViT-B/16")):
        encoder = em.load_encoder(kind, str(build(root / kind, kind)))
        encoder.features(frames[:1])  # warm-up
        encoder.cache.clear()
        start = time.perf_counter()
        encoder.features(frames)
        seconds = time.perf_counter() - start
        again = time.perf_counter()
        encoder.features(frames)
        cached = time.perf_counter() - again
        rates[label] = args.frames / seconds
        say(f"{label:52s} {rates[label]:7.2f} frames/s   (second pass, cached: {cached * 1000:.1f} ms)")
        if kind == "clip":
            start = time.perf_counter()
            encoder.encode_text(prompts)
            rates["CLIP ViT-L/14 text (CLIP-T)"] = args.frames / (time.perf_counter() - start)
            say(f"{'CLIP ViT-L/14 text (CLIP-T)':52s} {rates['CLIP ViT-L/14 text (CLIP-T)']:7.2f} prompts/s")
    import numpy as np
    from PIL import Image

    from storykit.tests.eval_fixtures import face_photos
    photo = Image.open(face_photos()["obama.jpg"]).convert("RGB").resize((args.size, args.size))
    face_frames = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0)[None] + \
        torch.linspace(0, 1e-3, args.frames)[:, None, None, None]  # distinct frames, so none comes from the cache
    face = em.FaceModel()
    start = time.perf_counter()
    found = sum(face.descriptor(f) is not None for f in face_frames)
    rates["dlib face (HOG detector + ResNet)"] = args.frames / (time.perf_counter() - start)
    say(f"{'dlib face (HOG detector + ResNet)':52s} {rates['dlib face (HOG detector + ResNet)']:7.2f} frames/s "
        f"  ({found}/{args.frames} faces found)")
    total = sum(CONSISTORY_FRAMES / r for r in rates.values())
    say(f"ConsiStory+ ({CONSISTORY_STORIES} stories, {CONSISTORY_FRAMES} frames), every metric, one pass per frame: "
        f"about {total / 60:.1f} min on this machine")


if __name__ == "__main__":
    main()
