"""The training loop both trainers share: grad mode inside the executor, cached data, host-style noise, progress with
the current loss, Cancel at the next step, atomic numbered checkpoints and resume.

Nothing here is a node; `nodes_train.py` holds the nodes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path
from typing import Callable

import comfy.model_management
import comfy.utils
import numpy as np
import safetensors.torch
import torch
import torch.utils.checkpoint
from PIL import Image, ImageDraw

from ..kernels import training as tk
from ..kernels.safefiles import atomic_save_safetensors, file_in_folders

log = logging.getLogger("storykit")

CHECKPOINT_DIR = "storykit_checkpoints"
STATE_SUFFIX = ".trainstate"


# ---------------------------------------------------------------------------------------------- autograd in the host
@contextlib.contextmanager
def grad_mode():
    """The executor runs nodes under torch.inference_mode(); autograd needs it switched off, and grad on."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def thaw(module: torch.nn.Module) -> None:
    """Swap inference tensors (weights loaded inside the executor) for ordinary ones with the same values.

    Autograd cannot save an inference tensor for backward, and a frozen layer between the input and a trained
    parameter must save its weight. The values are bit-identical, so every other user of the module is unaffected.
    Embedding tables are left alone: a lookup never saves its table, and the token table is the biggest tensor.
    """
    for mod in module.modules():
        if isinstance(mod, torch.nn.Embedding):
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- dynamic VRAM
def is_dynamic(patcher) -> bool:
    """Newer hosts' ModelPatcherDynamic (Dynamic VRAM, the default on recent NVIDIA installs) says so itself."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def _dynamic_error(node: str, what: str, exc: Exception) -> ValueError:
    return ValueError(f"{node}: the {what} uses ComfyUI's Dynamic VRAM, which streams weights layer by layer and "
                      f"cannot load them whole for training, and the host could not make a copy without it ({exc}). "
                      "Load the checkpoint with the stock Load Checkpoint node, or start ComfyUI with "
                      "--disable-dynamic-vram for training runs")


def resident(patcher, node: str, what: str = "model"):
    """The patcher to train through: this one, or, under Dynamic VRAM, the host's own copy without it.

    ModelPatcherDynamic.load() asserts against full loads and casts weights per layer from pinned buffers, so autograd
    cannot run through its weights. `clone(disable_dynamic=True)` is the host's way out: a plain ModelPatcher over a
    freshly loaded copy of the same checkpoint (its cached_patcher_init), with this patcher's patches and options.
    """
    if not is_dynamic(patcher):
        return patcher
    try:
        plain = patcher.clone(disable_dynamic=True)
    except (RuntimeError, TypeError) as exc:
        raise _dynamic_error(node, what, exc) from exc
    log.info("%s: training on a copy of the %s without Dynamic VRAM", node, what)
    return plain


def resident_clip(clip, node: str):
    """resident() for a CLIP: its text encoder module must be the one the non-dynamic patcher loads."""
    if not is_dynamic(clip.patcher):
        return clip
    try:
        plain = clip.clone(disable_dynamic=True)
    except (RuntimeError, TypeError) as exc:
        raise _dynamic_error(node, "text encoder", exc) from exc
    plain.cond_stage_model = plain.patcher.model
    log.info("%s: training on a copy of the text encoder without Dynamic VRAM", node)
    return plain


def _checkpoint_targets(module: torch.nn.Module):
    """The highest modules with their own forward below the containers (the host trainer's choice of segments)."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            yield from _checkpoint_targets(child)
        else:
            yield child


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool):
    """Recompute each block's activations in backward instead of keeping them (Chen et al. 2016); undone on exit."""
    if not enabled:
        yield
        return
    patched = []
    for block in _checkpoint_targets(diffusion_model):
        if not any(p.numel() for p in block.parameters()):
            continue
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward


@contextlib.contextmanager
def text_encoder_backprop(text_encoder: torch.nn.Module):
    """Let gradients pass through the host's CLIP text encoder while this is open.

    Its layers add residuals in place (x += attn(norm(x))), which overwrites the tensor a LayerNorm saved for
    backward; handing every LayerNorm a copy of its input keeps the saved tensor intact (values are unchanged).
    """
    def copy_input(module, args):
        return (args[0].clone(),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(copy_input) for m in text_encoder.modules()
               if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def clone_in(x: torch.Tensor) -> torch.Tensor:
    """A tensor from outside (made under inference mode) as an ordinary one autograd may save."""
    return x.detach().clone()


# ---------------------------------------------------------------------------------------------- data
def fit_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE [N, H, W, C] -> [N, 3, res, res] in 0..1: centre crop to square, resize (the usual trainer pre-processing)."""
    pixels = clone_in(images[..., :3]).movedim(-1, 1).float()
    return comfy.utils.common_upscale(pixels, resolution, resolution, "bilinear", "center").clamp(0, 1)


@torch.no_grad()
def encode_latents(model_patcher, vae, images: torch.Tensor, resolution: int, flips: bool) -> torch.Tensor:
    """Cached training latents: VAE-encode once (and the mirrored copies when flips are on), model-scaled."""
    pixels = fit_images(images, resolution)
    if flips:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    latents = vae.encode(pixels.movedim(1, -1))
    return clone_in(model_patcher.model.process_latent_in(latents)).float()


def sample_sigmas(model_sampling, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random noise levels the way the host's trainer draws them: percent_to_sigma(u), u uniform in (0, 1)."""
    u = torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
    return torch.tensor([model_sampling.percent_to_sigma(float(p)) for p in u], dtype=torch.float32)


def noise_coefficients(model_sampling, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with z_t = alpha x0 + sigma eps for this model's parameterisation (EPS/V: 1, s; flow: 1-s, s)."""
    ones, zeros = torch.ones_like(sigma), torch.zeros_like(sigma)
    alpha = model_sampling.noise_scaling(sigma, zeros.clone(), ones.clone())
    scale = model_sampling.noise_scaling(sigma, ones.clone(), zeros.clone())
    return alpha, scale


def model_conds(model_patcher, cross_attn: torch.Tensor, pooled: torch.Tensor | None, latent: torch.Tensor) -> dict:
    """The keyword conditions apply_model wants (c_crossattn, and y for SDXL), built by the model's own extra_conds."""
    h, w = latent.shape[-2] * 8, latent.shape[-1] * 8
    kwargs = {"cross_attn": cross_attn, "device": latent.device, "noise": latent, "width": w, "height": h,
              "target_width": w, "target_height": h, "crop_w": 0, "crop_h": 0}
    if pooled is not None:
        kwargs["pooled_output"] = pooled
    conds = model_patcher.model.extra_conds(**kwargs)
    return {k: v.cond for k, v in conds.items()}


def predict_noise(model_patcher, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                  cross_attn: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """eps_theta(z_t, t, c) through the host's own apply_model (input scaling, timestep, ADM all as in sampling)."""
    ms = model_patcher.model.model_sampling
    device = comfy.model_management.get_torch_device()
    sigma = sigma.to(device)
    alpha, scale = noise_coefficients(ms, sigma)
    x_t = tk.forward_diffusion(x0.to(device), noise.to(device), alpha, scale)
    conds = model_conds(model_patcher, cross_attn.to(device), None if pooled is None else pooled.to(device), x_t)
    x0_pred = model_patcher.model.apply_model(x_t, sigma, transformer_options={}, **conds)
    return tk.noise_from_denoised(x_t, x0_pred.float(), alpha, scale)


def step_generator(seed: int, step: int) -> torch.Generator:
    """One generator per step, so a resumed run draws exactly what an uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


# ---------------------------------------------------------------------------------------------- files
def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "storykit"


def reserve_stem(folder: Path, base: str, ext: str = ".safetensors") -> str:
    """The first of base, base_00002, ... whose final file and checkpoints do not exist: a run never overwrites."""
    folder = Path(folder)
    for n in range(1, 100000):
        stem = base if n == 1 else f"{base}_{n:05}"
        taken = (folder / f"{stem}{ext}").exists() or any((folder / CHECKPOINT_DIR).glob(f"{stem}_s*{ext}"))
        if not taken:
            return stem
    raise ValueError(f"StoryKit training: no free file name for {base!r} in {folder}; choose another name")


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors written to a temp file beside the target, then renamed: a cancelled write leaves no half file."""
    return atomic_save_safetensors(tensors, path, metadata)


def state_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(STATE_SUFFIX)


def save_train_state(path: Path, optimizers: list, history: dict[str, list[float]], step: int) -> None:
    """Optimizer moments and loss history beside a checkpoint (a suffix no loader lists), for an exact resume.

    optimizers: torch optimizers, or their state_dict()s."""
    tensors = {}
    for o, opt in enumerate(optimizers):
        for index, state in (opt if isinstance(opt, dict) else opt.state_dict())["state"].items():
            for key, value in state.items():
                tensors[f"opt{o}.{index}.{key}"] = torch.as_tensor(value)
    for name, values in history.items():
        tensors[f"history.{name}"] = torch.tensor(values, dtype=torch.float64)
    atomic_save(tensors, state_path(path), {"storykit.step": str(step)})


def read_checkpoint(path: Path, node: str, what: str = "resume_from") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, or an error that names the node, the input and the file."""
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{node}: {what} {Path(path).name} cannot be read ({exc}); the file is damaged: resume "
                         "from an earlier checkpoint or start fresh") from None


def load_train_state(path: Path, optimizers: list[torch.optim.Optimizer],
                     node: str = "StoryKit training") -> dict[str, list[float]]:
    """Restore what save_train_state wrote (if it is there); returns the loss history."""
    sidecar = state_path(path)
    if not sidecar.is_file():
        log.warning("StoryKit training: %s has no %s file; optimizer moments start fresh", path, STATE_SUFFIX)
        return {}
    data = read_checkpoint(sidecar, node, "the training state of resume_from")
    try:
        for o, opt in enumerate(optimizers):
            state = optimizer_state(data, o)
            if state:
                opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{node}: the training state {sidecar.name} does not fit this run ({exc}); resume with "
                         "the settings the checkpoint was trained with, or delete that file to start the optimizer "
                         "fresh") from None
    return {k[len("history."):]: v.tolist() for k, v in data.items() if k.startswith("history.")}


def optimizer_state(data: dict[str, torch.Tensor], o: int = 0) -> dict[int, dict]:
    """Optimizer o's per-parameter state from a training-state file's tensors."""
    state: dict[int, dict] = {}
    for key, value in data.items():
        prefix, _, rest = key.partition(".")
        if prefix == f"opt{o}":
            index, _, name = rest.partition(".")
            state.setdefault(int(index), {})[name] = value
    return state


def checkpoint_step(path: Path, node: str = "StoryKit training") -> int:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return int(meta.get("storykit.step", "0"))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{node}: resume_from {Path(path).name} has no readable step ({exc}); resume from a "
                         "checkpoint StoryKit saved") from None


def resolve_resume(folder: Path, name: str, node: str) -> Path | None:
    """A resume_from entry: empty for a fresh run, else a file name in the folder or its checkpoints folder.

    Paths out of those folders are refused with the same message as a missing or unreadable file, so the input
    tells nothing about the rest of the machine.
    """
    name = name.strip()
    if not name:
        return None
    path = file_in_folders(name, [folder, folder / CHECKPOINT_DIR], ("", ".safetensors"))
    if path is None:
        raise ValueError(f"{node}: resume_from {name!r} is not a readable checkpoint in {folder} or "
                         f"{folder / CHECKPOINT_DIR}; give the file name of a checkpoint there (or leave it empty "
                         "to start fresh)")
    return path


# ---------------------------------------------------------------------------------------------- the loop
def loss_curve(history: dict[str, list[float]], width: int = 512, height: int = 256) -> Image.Image:
    """Loss per step (log scale, moving average drawn over the raw values), one colour per term."""
    colors = {"loss": (30, 90, 200), "instance": (220, 120, 20), "prior": (40, 160, 70)}
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    series = {k: [max(v, 1e-12) for v in vals] for k, vals in history.items() if vals}
    if not series:
        return img
    pad = 28
    all_values = [math.log10(v) for vals in series.values() for v in vals]
    lo, hi = min(all_values), max(all_values)
    hi = hi if hi > lo else lo + 1e-6
    steps = max(len(v) for v in series.values())

    def point(i: int, value: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i / max(steps - 1, 1))
        y = height - pad - (height - 2 * pad) * ((math.log10(value) - lo) / (hi - lo))
        return x, y

    draw.rectangle([pad, pad, width - pad, height - pad], outline=(180, 180, 180))
    for row, (name, vals) in enumerate(series.items()):
        color = colors.get(name, (120, 120, 120))
        faint = tuple(int(c + (255 - c) * 0.7) for c in color)
        if len(vals) > 1:
            draw.line([point(i, v) for i, v in enumerate(vals)], fill=faint, width=1)
            k = max(1, len(vals) // 20)
            smooth = np.convolve(np.log10(vals), np.ones(k) / k, mode="valid")
            draw.line([point(i + k - 1, 10 ** s) for i, s in enumerate(smooth)], fill=color, width=2)
        draw.text((pad + 4 + 110 * row, 6), f"{name} {vals[-1]:.4f}", fill=color)
    draw.text((2, pad - 4), f"{10 ** hi:.3g}", fill=(0, 0, 0))
    draw.text((2, height - pad - 6), f"{10 ** lo:.3g}", fill=(0, 0, 0))
    draw.text((width - pad - 60, height - pad + 8), f"step {steps}", fill=(0, 0, 0))
    return img


def image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def run_steps(step_fn: Callable[[int, torch.Generator], dict[str, float]], *, start: int, total: int, seed: int,
              history: dict[str, list[float]], save: Callable[[int], None], save_every: int, label: str) -> None:
    """Call step_fn for steps start..total-1 with progress and the current loss; checkpoint every save_every steps.

    Cancel (the host's interrupt flag) is checked before each step, and the host's progress hook raises it right
    after a step: either way the run stops, first saving a checkpoint of the last finished step (labelled with the
    number of steps its vectors, optimizer state and loss history hold) if it is newer than the last saved one.
    """
    bar = comfy.utils.ProgressBar(total)
    bar.update_absolute(start, total)
    last_saved = done = start
    last_path = None
    preview_every = max(1, total // 25)
    try:
        for step in range(start, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            losses = step_fn(step, step_generator(seed, step))
            for key, value in losses.items():
                if not math.isfinite(value):
                    raise ValueError(f"{label}: the loss became {value} at step {step + 1}; lower the learning "
                                     "rate (or turn bf16 off) and resume from the last checkpoint")
                history.setdefault(key, []).append(value)
            done = step + 1  # from here on the state holds `done` steps, whatever raises next
            preview = ("JPEG", loss_curve(history, 256, 128), 256) if done % preview_every == 0 else None
            bar.update_absolute(done, total, preview)
            if done % max(1, preview_every) == 0 or done == total:
                log.info("%s: step %d/%d loss %.5f", label, done, total, losses.get("loss", float("nan")))
            if save_every and done % save_every == 0 and done < total:
                last_path = save(done)
                last_saved = done
    except comfy.model_management.InterruptProcessingException:
        if done > last_saved:
            last_path = save(done)
        if last_path is not None:
            log.warning("%s: cancelled after step %d; saved %s", label, done, last_path,
                        extra={"storykit_saved": str(last_path), "storykit_resume": "resume_from"})
        raise
