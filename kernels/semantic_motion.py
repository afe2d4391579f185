"""StoryDiffusion's Semantic Motion Predictor (stage 2): CLIP-image trajectories between two story frames.

The paper (Zhou et al. 2024, "StoryDiffusion", Sec. 3.2) encodes the start and end frame with a CLIP image encoder,
interpolates the two encodings to L frame embeddings, and lets a transformer predict per-frame embeddings P_1..P_L
that condition a video model frame by frame. Everything here is plain torch: interpolation, the frame-time layout of
the video models' latents, the predictor network, its training objective, and safetensors files with the config in
the metadata.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .safefiles import atomic_save_safetensors

# ---------------------------------------------------------------------------------------------- interpolation


def lerp(k_start: torch.Tensor, k_end: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sec. 3.2 step 2: K_i = (1 - t_i) K_s + t_i K_e, for every t_i in t ([L]) -> [L, *k.shape]."""
    t = t.to(k_start.dtype).view(-1, *([1] * k_start.ndim))
    out = (1 - t) * k_start.unsqueeze(0) + t * k_end.unsqueeze(0)
    # exact endpoints whatever the rounding of (1 - t) K_s + t K_e
    out = torch.where(t == 0, k_start.unsqueeze(0), out)
    return torch.where(t == 1, k_end.unsqueeze(0), out)


def slerp(k_start: torch.Tensor, k_end: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation per token (last dim), norms interpolated linearly: keeps |K| on the path of |K_s|..|K_e|.

    Directions move along the great circle (Shoemake 1985); the norm is (1 - t)|K_s| + t|K_e|, so two encodings of
    equal norm give a path of that norm, which linear interpolation shrinks towards the middle.
    """
    t = t.to(torch.float32).view(-1, *([1] * k_start.ndim))
    a, b = k_start.float(), k_end.float()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin < 1e-4  # nearly the same direction: the chord is the arc
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / sin.where(~parallel, torch.ones_like(sin)))
    wb = torch.where(parallel, t, torch.sin(t * omega) / sin.where(~parallel, torch.ones_like(sin)))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    out = (direction * ((1 - t) * na + t * nb)).to(k_start.dtype)
    out = torch.where(t == 0, k_start.unsqueeze(0), out)
    return torch.where(t == 1, k_end.unsqueeze(0), out)


INTERPOLATIONS = {"linear": lerp, "spherical": slerp}


# ---------------------------------------------------------------------------------------------- frame layout
@dataclass(frozen=True)
class FrameLayout:
    """How a video model's latent frames cover pixel frames: Wan 2.1's causal VAE packs 4 frames (the first alone)."""
    name: str
    temporal_compression: int

    def latent_frames(self, length: int) -> int:
        return (length - 1) // self.temporal_compression + 1

    def pixel_spans(self, length: int) -> list[tuple[int, int]]:
        """Pixel frames (first, last; inclusive, 0-based) that latent frame f covers: (0, 0), then 4f-3..4f."""
        c = self.temporal_compression
        return [(0, 0)] + [(c * f - c + 1, c * f) for f in range(1, self.latent_frames(length))]

    def frame_times(self, length: int) -> torch.Tensor:
        """Time in [0, 1] of each latent frame: its last pixel frame over the clip, so frame 0 is 0, the last is 1."""
        last = torch.tensor([b for _, b in self.pixel_spans(length)], dtype=torch.float64)
        return (last / max(length - 1, 1)).to(torch.float32)


LAYOUTS = {
    "wan21": FrameLayout("wan21", 4),
    "svd": FrameLayout("svd", 1),
}


# ---------------------------------------------------------------------------------------------- predictor
@dataclass
class PredictorConfig:
    """Sec. 3.2 step 3: 8 layers, hidden 1024; 16 heads (the paper's 12 does not divide 1024)."""
    embed_dim: int = 1280     # width of one CLIP token: 1280 ViT-H penultimate tokens (Wan), 1024 image_embeds (SVD)
    tokens: int = 257         # tokens per frame embedding (257 ViT-H/14 tokens, 1 for pooled embeds)
    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0
    embedding: str = "penultimate_hidden_states"
    extra: dict = field(default_factory=dict)

    def validate(self) -> "PredictorConfig":
        if self.hidden % self.heads:
            raise ValueError(f"predictor hidden size {self.hidden} is not divisible by heads {self.heads}: "
                             "pick heads that divide it (16 for 1024)")
        if min(self.embed_dim, self.tokens, self.hidden, self.layers, self.heads) < 1:
            raise ValueError(f"predictor sizes must be positive: {self}")
        return self


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the frame time t in [0, 1] (scaled to 0..1000 like diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float().unsqueeze(-1) * 1000.0 * freqs
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class PredictorBlock(nn.Module):
    """Pre-norm transformer block; `axis` says whether it attends across frames (time) or across a frame's tokens."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, axis: str):
        super().__init__()
        self.axis, self.heads = axis, heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, N, H]
        b, frames, tokens, hidden = x.shape
        seq = x.transpose(1, 2).reshape(b * tokens, frames, hidden) if self.axis == "time" \
            else x.reshape(b * frames, tokens, hidden)
        q, k, v = self.qkv(self.norm1(seq)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        seq = seq + self.proj(att)
        seq = seq + self.mlp(self.norm2(seq))
        if self.axis == "time":
            return seq.view(b, tokens, frames, hidden).transpose(1, 2)
        return seq.view(b, frames, tokens, hidden)


class SemanticMotionPredictor(nn.Module):
    """Sec. 3.2 step 3: interpolated embeddings K_1..K_L -> transformer -> P_1..P_L (a residual on K, zero at init).

    Layers alternate attention across time (each token position over the L frames) and across a frame's tokens,
    so a 257-token ViT-H frame costs L^2 + 257^2 attention, not (257 L)^2. The output layer starts at zero, so an
    untrained predictor returns its input, the training-free interpolation.
    """

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.proj_in = nn.Linear(c.embed_dim, c.hidden)
        self.time_mlp = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.token_pos = nn.Parameter(torch.zeros(1, 1, c.tokens, c.hidden))
        self.blocks = nn.ModuleList(
            PredictorBlock(c.hidden, c.heads, c.mlp_ratio, "time" if i % 2 == 0 or c.tokens == 1 else "tokens")
            for i in range(c.layers))
        self.norm_out = nn.LayerNorm(c.hidden)
        self.proj_out = nn.Linear(c.hidden, c.embed_dim)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or name == "token_pos":
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            self.proj_out.weight.zero_()

    def forward(self, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """k: [B, L, N, D] interpolated embeddings, t: [B, L] or [L] frame times -> P: [B, L, N, D]."""
        c = self.config
        if k.shape[-1] != c.embed_dim or k.shape[-2] != c.tokens:
            raise ValueError(f"the predictor was made for {c.tokens} tokens of width {c.embed_dim} "
                             f"({c.embedding}), got {k.shape[-2]} x {k.shape[-1]}")
        if t.ndim == 1:
            t = t.unsqueeze(0).expand(k.shape[0], -1)
        dtype = self.proj_in.weight.dtype
        h = self.proj_in(k.to(dtype)) + self.token_pos.to(dtype)
        h = h + self.time_mlp(time_embedding(t, c.hidden).to(dtype)).unsqueeze(2)
        for block in self.blocks:
            h = block(h)
        return k + self.proj_out(self.norm_out(h)).to(k.dtype)


def predict_trajectory(predictor: SemanticMotionPredictor | None, k_start: torch.Tensor, k_end: torch.Tensor,
                       t: torch.Tensor, interpolation: str = "linear") -> torch.Tensor:
    """[N, D] start and end encodings, [L] times -> [L, N, D]: the interpolation, refined by the predictor if given."""
    path = INTERPOLATIONS[interpolation](k_start, k_end, t)
    if predictor is None:
        return path
    param = next(predictor.parameters())
    out = predictor(path.unsqueeze(0).to(param.device), t.to(param.device))[0]
    return out.to(path.device, path.dtype)


# ---------------------------------------------------------------------------------------------- training
def clip_training_pair(embeds: torch.Tensor, frames: int, layout: FrameLayout | None = None):
    """One clip's per-pixel-frame encodings [n, N, D] -> (times [L], targets [L, N, D]) at the layout's frame times.

    The clip is resampled to `frames` trajectory frames (nearest pixel frame at each time); the targets are what
    the predictor must produce from the two ends alone.
    """
    n = embeds.shape[0]
    if n < 2:
        raise ValueError("a training clip needs at least 2 frames")
    t = layout.frame_times(frames * layout.temporal_compression - layout.temporal_compression + 1) \
        if layout is not None else torch.linspace(0, 1, frames)
    index = torch.round(t * (n - 1)).long()
    return t, embeds[index]


def predictor_loss(predictor: SemanticMotionPredictor, times: torch.Tensor, targets: torch.Tensor,
                   interpolation: str = "linear") -> torch.Tensor:
    """Training objective in embedding space: MSE between P(interp(K_first, K_last)) and the clip's embeddings.

    times [B, L], targets [B, L, N, D]. The paper trains through the video model's diffusion loss; without its
    weights the CLIP-space target is the part of that objective a user can train on their own clips.
    """
    interp = INTERPOLATIONS[interpolation]
    paths = torch.stack([interp(tg[0], tg[-1], tm) for tg, tm in zip(targets, times, strict=True)])
    pred = predictor(paths, times)
    return F.mse_loss(pred[:, 1:-1].float(), targets[:, 1:-1].float()) if targets.shape[1] > 2 \
        else F.mse_loss(pred.float(), targets.float())


# ---------------------------------------------------------------------------------------------- files
METADATA_KEY = "storykit.semantic_motion_predictor"


def predictor_metadata(config: PredictorConfig, **extra) -> dict[str, str]:
    meta = {METADATA_KEY: json.dumps(asdict(config), sort_keys=True), "format": "pt"}
    meta.update({f"storykit.{k}": json.dumps(v) for k, v in extra.items()})
    return meta


def save_predictor(predictor: SemanticMotionPredictor, path: str, **extra) -> str:
    """Write weights + config (metadata) atomically: a temp file next to `path`, then os.replace."""
    atomic_save_safetensors(predictor.state_dict(), path, predictor_metadata(predictor.config, **extra),
                            overwrite=True)
    return path


CONFIG_TYPES = {"embed_dim": int, "tokens": int, "hidden": int, "layers": int, "heads": int,
                "mlp_ratio": (int, float), "embedding": str, "extra": dict}


def _config(raw: str, name: str) -> PredictorConfig:
    """The config in a file's metadata, checked field by field before anything is built from it."""
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    bad = "it is not a JSON object" if not isinstance(fields, dict) else next(
        (f"{k}={v!r}" for k, v in fields.items()
         if k not in CONFIG_TYPES or isinstance(v, bool) or not isinstance(v, CONFIG_TYPES[k])
         or (isinstance(v, float) and not 0 < v < 64)), None)
    if bad:
        raise ValueError(f"{name}: the predictor config in its metadata is damaged ({bad}); save the predictor "
                         "again with the StoryKit saver or trainer")
    return PredictorConfig(**fields).validate()


def read_metadata(path: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata with the config checked, {tensor name: shape}) from the header alone: no tensor is read."""
    from safetensors import SafetensorError, safe_open
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{name} is not a readable safetensors file ({exc}); the file is damaged or is not a "
                         "predictor") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{name} is not a Semantic Motion Predictor file (no {METADATA_KEY} in "
                         "its metadata): save predictors with the StoryKit saver or trainer")
    out = {}
    for key, value in meta.items():
        if key.startswith("storykit.") and key != METADATA_KEY:
            try:
                out[key[len("storykit."):]] = json.loads(value)
            except ValueError:
                raise ValueError(f"{name}: its metadata {key} is damaged; save the predictor again") from None
    out["config"] = _config(meta[METADATA_KEY], name)
    return out, shapes


def load_predictor(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """-> (predictor in eval mode, metadata dict). The config is checked against the tensors' shapes (on the meta
    device, so nothing is allocated) before the model is built; weights load exactly as saved (strict)."""
    from safetensors.torch import load_file
    meta, shapes = read_metadata(path)
    config = meta["config"]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SemanticMotionPredictor(config).state_dict().items()}
    if expected != shapes:
        key = next(k for k in sorted(expected.keys() | shapes.keys()) if expected.get(k) != shapes.get(k))
        raise ValueError(f"{os.path.basename(path)}: its tensors do not match its config (at {key}: the file holds "
                         f"{shapes.get(key)}, the config wants {expected.get(key)}); the file is damaged or was "
                         "not written by StoryKit")
    predictor = SemanticMotionPredictor(config)
    predictor.load_state_dict(load_file(path, device=str(device)), strict=True)
    predictor.to(device=device, dtype=dtype).eval()
    meta["config"] = asdict(config)
    return predictor, meta
