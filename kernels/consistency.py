"""Story consistency metrics: similarity matrices, pair statistics, CLIPScore and subject masks (plain torch).

Conventions (what the papers report, so numbers compare with One-Prompt-One-Story's Table 1 and ViStoryBench):
- CLIP-T: CLIPScore (Hessel et al. 2021), 2.5 * max(cos(image embedding, text embedding), 0), full frame.
- CLIP-I: cosine of CLIP image embeddings, averaged over every unordered pair of frames of a story.
- DreamSim: distance 1 - cos of DreamSim embeddings over the same pairs (lower is more alike).
- DINO: cosine of DINOv2 class-token embeddings over the same pairs.
- Face: Euclidean distance of face descriptors per pair; "same person" below the model's published threshold.
Identity metrics (CLIP-I, DreamSim, DINO) are computed after background removal when a subject mask is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIPSCORE_WEIGHT = 2.5  # Hessel et al.: rescales cosines of about 0.3 into a readable range


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) cosine similarities, computed once from the features (never per pair)."""
    f = F.normalize(features.float(), dim=-1)
    return (f @ f.T).clamp(-1.0, 1.0)


def euclidean_matrix(features: torch.Tensor) -> torch.Tensor:
    f = features.float()
    return torch.cdist(f, f)


def pair_values(matrix: torch.Tensor, valid: list[bool] | None = None) -> list[float]:
    """The upper triangle (i < j) of a pair matrix, skipping frames marked invalid (e.g. no face found)."""
    n = matrix.shape[0]
    keep = valid if valid is not None else [True] * n
    return [float(matrix[i, j]) for i in range(n) for j in range(i + 1, n) if keep[i] and keep[j]]


def summary(values: list[float]) -> dict:
    """mean, std (population), min, max and count; mean None when there is nothing to average (say so, no 0/0)."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIPScore per frame: 2.5 * max(cos(image_i, text_i), 0) for matched rows (Hessel et al. 2021, eq. 1)."""
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return CLIPSCORE_WEIGHT * cos.clamp(min=0.0)


def apply_masks(images: torch.Tensor, masks: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor:
    """Background removal: (N, H, W, C) frames composited over a flat `fill` colour where the (N, H, W) subject mask
    is 0 (black is what a cut-out with its alpha dropped becomes). Masks of another size are resized to the frame."""
    if masks is None:
        return images
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] == 1 and images.shape[0] > 1:
        masks = masks.expand(images.shape[0], -1, -1)
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for {images.shape[0]} frames: give one mask per frame, or one "
                         "for all")
    m = masks.float()
    if m.shape[1:] != images.shape[1:3]:
        m = F.interpolate(m[:, None], size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    m = m.clamp(0, 1)[..., None].to(images.device)
    return images[..., :3] * m + fill * (1 - m)


def preprocess(images: torch.Tensor, size: int, mean, std, crop: bool = True) -> torch.Tensor:
    """(N, H, W, C) in [0, 1] -> (N, 3, size, size) normalised: bicubic resize of the short side and centre crop
    (CLIP's and DINOv2's evaluation transform), or a plain resize to size x size (DreamSim's, crop=False)."""
    x = images[..., :3].float().movedim(-1, 1)
    h, w = x.shape[2:]
    if crop:
        scale = size / min(h, w)
        target = (max(size, round(h * scale)), max(size, round(w * scale)))
    else:
        target = (size, size)
    if target != (h, w):
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def aggregate(story_means: list[float | None]) -> dict:
    """Benchmark row: mean and spread (std over stories) of the per-story means, stories without a value left out."""
    return summary([v for v in story_means if v is not None])
