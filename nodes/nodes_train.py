"""Personalisation inside ComfyUI: Textual Inversion (Gal et al. 2023) and DreamBooth with class-prior preservation
(Ruiz et al. 2023), trained in-process on the host's own MODEL / CLIP / VAE.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import tempfile
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.sd
import folder_paths
import safetensors.torch
import torch
from .v3 import io

from ..kernels import training as tk
from . import training as tr

log = logging.getLogger("storykit")

# Gal et al.'s prompt lists (the ones the reference implementation ships, abridged).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]
PRECISIONS = ["auto", "fp32", "bf16"]
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TEXT_LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


# ---------------------------------------------------------------------------------------------- shared helpers
def _autocast(precision: str, half_weights: torch.dtype | None = None):
    """bf16 autocast when asked (or on capable GPUs for 'auto'); always on for fp32 master copies of half weights."""
    device = comfy.model_management.get_torch_device()
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                        and comfy.model_management.should_use_bf16(device))
    dtype = torch.bfloat16 if use_bf16 else half_weights
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _sub_encoders(clip) -> list[str]:
    """The tokenizer keys of this CLIP ("l" for SD1.5, "l" and "g" for SDXL)."""
    keys = [k for k in ("l", "g", "h") if hasattr(clip.tokenizer, f"clip_{k}") and
            hasattr(clip.cond_stage_model, f"clip_{k}")]
    if not keys:
        raise ValueError("StoryKit training: this CLIP is not a CLIP-L/G text encoder; textual inversion and "
                         "DreamBooth here support SD1.x and SDXL models")
    return keys


def _tokenize(clip, tokenizer, text: str):
    options = getattr(clip, "tokenizer_options", None) or {}
    return tokenizer.tokenize_with_weights(text, False, **({"tokenizer_options": options} if options else {}))


def _encode(clip, tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def _prepare(model, clip, backprop_clip: bool, node: str):
    """Load what autograd passes through fully, the host's way, and make its weights usable by autograd (values
    unchanged). Returns the MODEL and CLIP to train through: these, or copies without Dynamic VRAM (tr.resident)."""
    model = tr.resident(model, node, "model")
    if backprop_clip:
        clip = tr.resident_clip(clip, node)
    trained = [model, clip.patcher] if backprop_clip else [model]
    comfy.model_management.load_models_gpu(trained, force_full_load=True)
    for p in trained:
        tr.thaw(p.model)
        tr.freeze(p.model)
    return model, clip


def _subject_inputs(images: str, clip_tooltip: str) -> list:
    """The inputs both trainers start with: the frozen checkpoint parts and the subject's pictures."""
    return [
        io.Model.Input("model", tooltip="The checkpoint's MODEL; the input itself stays unchanged."),
        io.Clip.Input("clip", tooltip=clip_tooltip),
        io.Vae.Input("vae", tooltip="Encodes the pictures once (cached latents)."),
        io.Image.Input(images, tooltip="3-5 pictures of the subject (a batch); centre-cropped to square."),
    ]


def _check_images(node: str, images, name: str = "images") -> None:
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{node}: '{name}' needs at least one picture; connect a Load Image (batch) node")


def _finish_image(history: dict[str, list[float]]):
    return tr.image_tensor(tr.loss_curve(history))


# ---------------------------------------------------------------------------------------------- textual inversion
class TextualInversionSession:
    """Prompts with a placeholder whose rows are trainable tensors; the encoders themselves are never touched."""

    SENTINEL = -1000.0

    def __init__(self, clip, token: str, vectors: int):
        self.clip, self.vectors = clip, vectors
        self.keys = _sub_encoders(clip)
        self.tokenizer = copy.copy(clip.tokenizer)
        self._tmp = tempfile.TemporaryDirectory(prefix="storykit-ti-")
        self.placeholder = "storykit_placeholder"
        file = {}
        for k in self.keys:
            sub = copy.copy(getattr(clip.tokenizer, f"clip_{k}"))
            sub.embedding_directory = [self._tmp.name]  # the stock embedding path, pointed at the placeholder only
            setattr(self.tokenizer, f"clip_{k}", sub)
            rows = self.SENTINEL - torch.arange(vectors, dtype=torch.float32)[:, None]
            file[sub.embedding_key] = rows.expand(vectors, sub.embedding_size).contiguous()
        safetensors.torch.save_file(file, str(Path(self._tmp.name) / f"{self.placeholder}.safetensors"))
        self.token = token

    def embedding_keys(self) -> dict[str, str]:
        return {k: getattr(self.tokenizer, f"clip_{k}").embedding_key for k in self.keys}

    def initial_rows(self, word: str, node: str) -> dict[str, torch.Tensor]:
        """Each vector starts as the initializer word's token embedding (tiled if the word has several tokens)."""
        rows = {}
        for k in self.keys:
            sub = getattr(self.tokenizer, f"clip_{k}")
            ids = sub.tokenizer(word)["input_ids"][sub.tokens_start:-1] if word.strip() else []
            if not ids:
                raise ValueError(f"{node}: initializer_word {word!r} gives no tokens; use one plain word such as "
                                 "'person', 'dog' or 'painting'")
            table = getattr(self.clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings().weight
            picked = torch.tensor([ids[i % len(ids)] for i in range(self.vectors)])
            rows[k] = tr.clone_in(table.detach()[picked].float().cpu())
        return rows

    def prompt_tokens(self, template: str):
        """Tokenize a template with the placeholder where `{}` stands; returns tokens with (key, row) markers."""
        text = template.replace("{}", f"embedding:{self.placeholder} ")
        tokens = _tokenize(self.clip, self.tokenizer, text)
        marked = {}
        for k, batches in tokens.items():
            out = []
            for batch in batches:
                row_list = []
                for token, weight in batch:
                    if torch.is_tensor(token):
                        token = ("row", int(round(self.SENTINEL - float(token[0]))))
                    row_list.append((token, weight))
                out.append(row_list)
            marked[k] = out
        return marked

    @staticmethod
    def fill(marked, params: dict[str, torch.Tensor]):
        """The marked tokens with the current trainable rows in place of the placeholder (autograd flows in)."""
        return {k: [[(params[k][t[1]] if isinstance(t, tuple) else t, w) for t, w in batch] for batch in batches]
                for k, batches in marked.items()}

    def close(self):
        self._tmp.cleanup()


def train_textual_inversion(model, clip, vae, images, *, token: str, initializer_word: str, vectors: int, steps: int,
                            learning_rate: float, batch_size: int, resolution: int, templates: list[str], seed: int,
                            flips: bool = True, precision: str = "auto", gradient_checkpointing: bool = False,
                            save_every: int = 0, resume_from: str = "", folder: Path | None = None,
                            node: str = "StoryKit Textual Inversion"):
    """Train the rows of `token`; returns (file path, {key: rows}, loss history)."""
    folder = Path(folder or folder_paths.get_folder_paths("embeddings")[0])
    stem = tr.reserve_stem(folder, tr.safe_stem(token))
    session = TextualInversionSession(clip, token, vectors)
    try:
        marked = [session.prompt_tokens(t) for t in templates]
        keys = session.embedding_keys()
        with tr.grad_mode():
            model, clip = _prepare(model, clip, backprop_clip=True, node=node)
            latents = tr.encode_latents(model, vae, images, resolution, flips)
            params = {k: torch.nn.Parameter(v) for k, v in session.initial_rows(initializer_word, node).items()}
            optimizer = torch.optim.AdamW(params.values(), lr=learning_rate, weight_decay=0.0)
            history: dict[str, list[float]] = {}
            start = 0
            resume = tr.resolve_resume(folder, resume_from, node)
            if resume is not None:
                saved = tr.read_checkpoint(resume, node)
                for k, key in keys.items():
                    if key not in saved or saved[key].shape != params[k].shape:
                        raise ValueError(f"{node}: resume_from {resume.name} has no {key} rows of shape "
                                         f"{tuple(params[k].shape)}; use a checkpoint of this token and model")
                    params[k].data.copy_(saved[key])
                history = tr.load_train_state(resume, [optimizer], node)
                start = tr.checkpoint_step(resume, node)
            ms = model.model.model_sampling

            def save(step: int, path: Path | None = None) -> Path:
                path = path or folder / tr.CHECKPOINT_DIR / f"{stem}_s{step:06}.safetensors"
                meta = {"storykit.step": str(step), "storykit.token": token, "storykit.vectors": str(vectors)}
                tr.atomic_save({key: params[k].detach().float() for k, key in keys.items()}, path, meta)
                tr.save_train_state(path, [optimizer], history, step)
                return path

            def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
                pick = torch.randint(len(latents), (batch_size,), generator=gen)
                prompts = torch.randint(len(marked), (batch_size,), generator=gen)
                x0 = latents[pick]
                noise = torch.randn(x0.shape, generator=gen)
                sigma = tr.sample_sigmas(ms, batch_size, gen)
                with _autocast(precision):
                    encoded = [_encode(clip, session.fill(marked[int(i)], params)) for i in prompts]
                    cond = torch.cat([c for c, _ in encoded])
                    pooled = torch.cat([p for _, p in encoded]) if encoded[0][1] is not None else None
                    eps = tr.predict_noise(model, x0, noise, sigma, cond, pooled)
                loss = tk.noise_prediction_mse(eps, noise.to(eps.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return {"loss": float(loss.detach())}

            with tr.gradient_checkpointing(model.model.diffusion_model, gradient_checkpointing), \
                    tr.text_encoder_backprop(clip.cond_stage_model):
                tr.run_steps(step_fn, start=start, total=steps, seed=seed, history=history, save=save,
                             save_every=save_every, label=node)
            final = save(steps, folder / f"{stem}.safetensors")
            rows = {key: params[k].detach().float().cpu() for k, key in keys.items()}
    finally:
        session.close()
    return final, rows, history


class StoryKitTrainTextualInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitTrainTextualInversion",
            display_name="Train Textual Inversion (StoryKit)",
            category="StoryKit/train",
            description="Learns new word vectors for your character from 3-5 pictures (Gal et al. 2023). Only the "
                        "new vectors train: the model, text encoder and VAE are untouched. The embedding is saved "
                        "in the embeddings folder; write embedding:<name> in any prompt.",
            inputs=[
                *_subject_inputs("images", "The checkpoint's CLIP; SDXL trains CLIP-L and CLIP-G rows together."),
                io.String.Input("token_name", default="storykit_hero",
                                tooltip="File name of the embedding; use it as embedding:<name> in prompts. An "
                                        "existing file is never overwritten (a numbered name is used)."),
                io.String.Input("initializer_word", default="person",
                                tooltip="One word for what the subject is ('person', 'dog', 'vase'); the new "
                                        "vectors start from it, so the first pictures already look like one."),
                io.Int.Input("vectors_per_token", default=1, min=1, max=16,
                             tooltip="Vectors the name stands for. 1 is the paper's default; 2-4 hold more detail "
                                     "but take prompt space and over-fit sooner."),
                io.Int.Input("steps", default=1000, min=1, max=100000,
                             tooltip="Optimisation steps (paper: 5000; 500-3000 usually suffice)."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4,
                               tooltip="Step size for the vectors (paper: 5e-3 at batch 4 scaled; 5e-3 to 1e-4)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pictures per step."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training size in pixels: 512 for SD1.5, 1024 for SDXL."),
                io.Combo.Input("templates", options=["object", "style", "custom"], default="object",
                               tooltip="Captions: 'object' (a photo of a {}) for a character or thing, 'style' (a "
                                       "painting in the style of {}) for a look, 'custom' uses the lines below."),
                io.String.Input("custom_templates", multiline=True, default="a photo of {}\nan illustration of {}",
                                tooltip="One caption per line, {} where the new word goes (used when templates is "
                                        "'custom')."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise, noise levels, captions and flips per step all follow this seed."),
                io.Boolean.Input("random_flips", default=True, optional=True,
                                 tooltip="Mirror pictures at random (paper default); off for asymmetric subjects."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto", optional=True,
                               tooltip="auto: bf16 autocast on GPUs that support it, else fp32."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute activations in backward: less memory, about 30% slower."),
                io.Int.Input("save_every", default=250, min=0, max=100000, optional=True,
                             tooltip="Write a checkpoint every N steps to embeddings/storykit_checkpoints (0: only "
                                     "at the end). Cancel also keeps the last finished step."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A checkpoint's file name in embeddings/ or embeddings/storykit_checkpoints to "
                                        "continue from (empty: start fresh); paths out of those folders are refused."),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="The same CLIP; wire your prompts to it so they are "
                                                            "encoded after training."),
                io.String.Output(display_name="prompt_word", tooltip="embedding:<name> as saved."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, token_name, initializer_word, vectors_per_token, steps, learning_rate,
                batch_size, resolution, templates, custom_templates, seed, random_flips=True, precision="auto",
                gradient_checkpointing=False, save_every=250, resume_from="") -> io.NodeOutput:
        node = "StoryKit Train Textual Inversion"
        _check_images(node, images)
        lines = _templates(node, templates, custom_templates)
        path, _, history = train_textual_inversion(
            model, clip, vae, images, token=token_name, initializer_word=initializer_word, vectors=vectors_per_token,
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, resolution=resolution, templates=lines,
            seed=seed, flips=random_flips, precision=precision, gradient_checkpointing=gradient_checkpointing,
            save_every=save_every, resume_from=resume_from, node=node)
        return io.NodeOutput(clip.clone(), f"embedding:{path.stem}", _finish_image(history))


def _templates(node: str, kind: str, custom: str) -> list[str]:
    if kind == "object":
        return OBJECT_TEMPLATES
    if kind == "style":
        return STYLE_TEMPLATES
    lines = [line.strip() for line in custom.splitlines() if line.strip()]
    bad = [line for line in lines if line.count("{}") != 1]
    if not lines or bad:
        raise ValueError(f"{node}: custom_templates needs lines with exactly one {{}} each; fix: {bad or '(empty)'}")
    return lines


# ---------------------------------------------------------------------------------------------- dreambooth
class LoRA(torch.nn.Module):
    """A low-rank update beside a frozen Linear: y = W x + (alpha / r) B A x (Hu et al. 2021, eq. 3)."""

    def __init__(self, linear: torch.nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = linear.weight.shape
        object.__setattr__(self, "target", linear)  # not a submodule: its weight must stay out of parameters()
        self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features ** 0.5)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.alpha = float(alpha)

    def hook(self, module, args, output):
        x = args[0]
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return output + update * (self.alpha / self.down.shape[0])


def _attach_lora(root: torch.nn.Module, prefix: str, targets: tuple[str, ...], rank: int, alpha: float,
                 generator: torch.Generator) -> dict[str, LoRA]:
    found = {}
    for name, module in root.named_modules():
        if name.endswith(targets) and hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2:
            found[f"{prefix}{name}"] = LoRA(module, rank, alpha, generator)
    return found


def lora_state_dict(loras: dict[str, LoRA]) -> dict[str, torch.Tensor]:
    """Keys the stock LoraLoader reads: <module path>.lora_up.weight / .lora_down.weight / .alpha."""
    sd = {}
    for key, lora in loras.items():
        sd[f"{key}.lora_up.weight"] = lora.up.detach().float().cpu()
        sd[f"{key}.lora_down.weight"] = lora.down.detach().float().cpu()
        sd[f"{key}.alpha"] = torch.tensor(lora.alpha)
    return sd


def _model_fingerprint(model) -> str:
    """Cheap identity of the weights a MODEL samples with (per-tensor sums plus its patches), for the class cache."""
    h = hashlib.sha1()
    with torch.no_grad():
        sums = torch.stack([p.detach().float().sum().cpu() for p in model.model.diffusion_model.parameters()])
    h.update(sums.numpy().tobytes())
    h.update(repr(sorted((k, len(v)) for k, v in model.patches.items())).encode())
    return h.hexdigest()[:16]


def class_prior_latents(model, clip, class_prompt: str, count: int, resolution: int, seed: int, sample_steps: int,
                        cfg: float, sampler_name: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """Ruiz et al. sec. 3.3: class examples x_pr from the frozen model with the host's sampler, cached on disk."""
    key = hashlib.sha1(repr((class_prompt, count, resolution, seed, sample_steps, cfg, sampler_name, scheduler,
                             _model_fingerprint(model))).encode()).hexdigest()[:20]
    cache = Path(folder_paths.get_output_directory()) / "storykit_train" / "class_priors" / f"{key}.safetensors"
    if cache.is_file():
        log.info("StoryKit DreamBooth: class images for %r from cache %s", class_prompt, cache)
        return safetensors.torch.load_file(str(cache))["latents"]
    positive = _conditioning(clip, class_prompt)
    negative = _conditioning(clip, "")
    channels = model.model.latent_format.latent_channels
    out = []
    for start in range(0, count, 4):
        n = min(4, count - start)
        empty = torch.zeros([n, channels, resolution // 8, resolution // 8])
        noise = comfy.sample.prepare_noise(empty, seed + start)
        out.append(comfy.sample.sample(model, noise, sample_steps, cfg, sampler_name, scheduler, positive, negative,
                                       empty, seed=seed + start, disable_pbar=True).float().cpu())
    latents = torch.cat(out)
    tr.atomic_save({"latents": latents}, cache, {"storykit.class_prompt": class_prompt})
    return latents


def _conditioning(clip, text: str):
    cond, pooled = _encode(clip, _tokenize(clip, clip.tokenizer, text))
    return [[cond, {"pooled_output": pooled}]]


def train_dreambooth(model, clip, vae, instance_images, *, identifier: str, class_noun: str, prior_preservation: bool,
                     prior_weight: float, class_latents: torch.Tensor | None, mode: str, rank: int, alpha: float,
                     train_text_encoder: bool, learning_rate: float, text_encoder_lr: float, steps: int,
                     batch_size: int, resolution: int, gradient_checkpointing: bool, seed: int,
                     precision: str = "auto", save_every: int = 0, resume_from: str = "", name: str = "storykit_db",
                     flips: bool = True, node: str = "StoryKit DreamBooth"):
    """Returns (trained MODEL, trained CLIP, saved file, history)."""
    lora_mode = mode == "LoRA"
    folder = Path(folder_paths.get_folder_paths("loras" if lora_mode else "checkpoints")[0])
    stem = tr.reserve_stem(folder, tr.safe_stem(name))
    instance_prompt = f"a {identifier} {class_noun}".strip()
    class_prompt = f"a {class_noun}".strip()
    if not lora_mode and resume_from.strip():
        raise ValueError(f"{node}: resume_from works in LoRA mode; for a full fine-tune load the saved checkpoint "
                         "with Load Checkpoint and train on from it")
    with torch.no_grad():
        encoded = {p: _encode(clip, _tokenize(clip, clip.tokenizer, p)) for p in (instance_prompt, class_prompt)}
    tokens = {p: _tokenize(clip, clip.tokenizer, p) for p in (instance_prompt, class_prompt)}
    base_model, base_clip = model, clip  # the graph's MODEL/CLIP: the outputs are clones of these
    with tr.grad_mode():
        model, clip = _prepare(model, clip, backprop_clip=train_text_encoder, node=node)
        unet = model.model.diffusion_model
        te = clip.cond_stage_model
        latents = tr.encode_latents(model, vae, instance_images, resolution, flips)
        text = {k: (tr.clone_in(c), None if p is None else tr.clone_in(p)) for k, (c, p) in encoded.items()}
        prior = tr.clone_in(class_latents).float() if (prior_preservation and class_latents is not None) else None
        if prior is not None:
            prior = model.model.process_latent_in(prior)
        gen = torch.Generator().manual_seed(seed)
        groups, loras, originals, full = [], {}, {}, {}
        weight_dtype = model.model.get_dtype()
        half_weights = weight_dtype if (not lora_mode and weight_dtype in (torch.float16, torch.bfloat16)) else None
        handles = []
        try:
            if lora_mode:
                loras = _attach_lora(unet, "diffusion_model.", LORA_TARGETS, rank, alpha, gen)
                groups.append({"params": [p for m in loras.values() for p in m.parameters()], "lr": learning_rate})
            else:  # fp32 master copies; a half-precision model then computes under autocast in its own dtype
                for pname, p in list(unet.named_parameters()):
                    originals[pname] = p
                    full[pname] = torch.nn.Parameter(p.detach().float().clone())
                    _set_param(unet, pname, full[pname])
                groups.append({"params": list(full.values()), "lr": learning_rate})
            te_loras = {}
            if train_text_encoder:
                te_loras = _attach_lora(te, "text_encoders.", TEXT_LORA_TARGETS, rank, alpha, gen)
                groups.append({"params": [p for m in te_loras.values() for p in m.parameters()], "lr": text_encoder_lr})
            optimizer = torch.optim.AdamW(groups, weight_decay=1e-2 if lora_mode else 0.0)
            handles += [m.target.register_forward_hook(m.hook) for m in (*loras.values(), *te_loras.values())]
            history: dict[str, list[float]] = {}
            start = 0
            resume = tr.resolve_resume(folder, resume_from, node)
            if resume is not None:
                _load_loras(node, resume, {**loras, **te_loras})
                history = tr.load_train_state(resume, [optimizer], node)
                start = tr.checkpoint_step(resume, node)
            ms = model.model.model_sampling

            def state_dict() -> dict[str, torch.Tensor]:
                if lora_mode:
                    return lora_state_dict({**loras, **te_loras})
                clip_sd = clip.get_sd()
                for key, lora in te_loras.items():  # bake the text-encoder LoRA into the checkpoint's CLIP weights
                    wkey = key[len("text_encoders."):] + ".weight"
                    clip_sd[wkey] = clip_sd[wkey] + tk.lora_delta(lora.down.detach(), lora.up.detach(),
                                                                  lora.alpha).to(clip_sd[wkey])
                return model.model.state_dict_for_saving(clip_sd, vae.get_sd(), None)

            def save(step: int, path: Path | None = None) -> Path:
                path = path or folder / tr.CHECKPOINT_DIR / f"{stem}_s{step:06}.safetensors"
                meta = {"storykit.step": str(step), "storykit.instance_prompt": instance_prompt,
                        "storykit.class_prompt": class_prompt, "storykit.mode": mode}
                tr.atomic_save(state_dict(), path, meta)
                tr.save_train_state(path, [optimizer], history, step)
                return path

            def conds(prompt: str, n: int):
                if train_text_encoder:
                    c, p = _encode(clip, tokens[prompt])
                else:
                    c, p = text[prompt]
                return c.expand(n, -1, -1), None if p is None else p.expand(n, -1)

            def step_fn(step: int, g: torch.Generator) -> dict[str, float]:
                # Eq. 2's two terms are backpropagated one after the other (gradients add up to the gradient of the
                # sum), so only one pass's activations are alive at a time.
                optimizer.zero_grad(set_to_none=True)
                x0 = latents[torch.randint(len(latents), (batch_size,), generator=g)]
                noise = torch.randn(x0.shape, generator=g)
                sigma = tr.sample_sigmas(ms, batch_size, g)
                with _autocast(precision, half_weights):
                    eps = tr.predict_noise(model, x0, noise, sigma, *conds(instance_prompt, batch_size))
                noise = noise.to(eps.device)
                instance = tk.noise_prediction_mse(eps, noise)
                instance.backward()
                if prior is None:
                    optimizer.step()
                    return {"loss": float(instance.detach())}
                xp = prior[torch.randint(len(prior), (batch_size,), generator=g)]
                noise_p = torch.randn(xp.shape, generator=g)
                sigma_p = tr.sample_sigmas(ms, batch_size, g)
                with _autocast(precision, half_weights):
                    eps_p = tr.predict_noise(model, xp, noise_p, sigma_p, *conds(class_prompt, batch_size))
                noise_p = noise_p.to(eps_p.device)
                (prior_weight * tk.noise_prediction_mse(eps_p, noise_p)).backward()
                optimizer.step()
                total, inst, pri = tk.prior_preservation_loss(eps.detach(), noise, eps_p.detach(), noise_p, prior_weight)
                return {"loss": float(total), "instance": float(inst), "prior": float(pri)}

            with tr.gradient_checkpointing(unet, gradient_checkpointing), \
                    (tr.text_encoder_backprop(te) if train_text_encoder else contextlib.nullcontext()):
                tr.run_steps(step_fn, start=start, total=steps, seed=seed, history=history, save=save,
                             save_every=save_every, label=node)
            final = save(steps, folder / f"{stem}.safetensors")
            deltas = {f"diffusion_model.{k}": (full[k].detach() - originals[k].detach().float()).to(
                "cpu", originals[k].dtype) for k in full}  # patches stay on the CPU; the host moves them on load
            sd = lora_state_dict({**loras, **te_loras})
        finally:
            for h in handles:
                h.remove()
            for pname, p in originals.items():
                _set_param(unet, pname, p)
    # The MODEL/CLIP for the rest of the graph: exactly what the stock LoRA loader makes of the saved weights.
    if lora_mode:
        out_model, out_clip = comfy.sd.load_lora_for_models(base_model, base_clip if te_loras else None, sd, 1.0, 1.0)
    else:
        out_model = base_model.clone()
        out_model.add_patches({k: (v,) for k, v in deltas.items()}, 1.0)
        out_clip = comfy.sd.load_lora_for_models(None, base_clip, sd, 0.0, 1.0)[1] if te_loras else None
    return out_model, out_clip or base_clip, final, history


def _set_param(root: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, value)


def _load_loras(node: str, path: Path, loras: dict[str, LoRA]) -> None:
    saved = tr.read_checkpoint(path, node)
    for key, lora in loras.items():
        up, down = saved.get(f"{key}.lora_up.weight"), saved.get(f"{key}.lora_down.weight")
        if up is None or down is None or up.shape != lora.up.shape or down.shape != lora.down.shape:
            raise ValueError(f"{node}: resume_from {path.name} does not match this model, rank and text-encoder "
                             f"setting (at {key}); resume with the settings it was trained with")
        lora.up.data.copy_(up)
        lora.down.data.copy_(down)


class StoryKitTrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitTrainDreamBooth",
            display_name="Train DreamBooth (StoryKit)",
            category="StoryKit/train",
            description="Fine-tunes the model on 3-5 pictures labelled 'a [identifier] [class noun]' with class-prior "
                        "preservation (Ruiz et al. 2023). Gives the trained MODEL and CLIP for this graph and saves "
                        "a LoRA (Load LoRA reads it) or a checkpoint.",
            inputs=[
                *_subject_inputs("instance_images", "The checkpoint's CLIP (encodes the captions; trains with a "
                                                    "LoRA when train_text_encoder is on)."),
                io.String.Input("identifier", default="sks",
                                tooltip="Rare word that will mean your subject (see Propose Rare Identifiers). "
                                        "Prompts then say 'a sks person'."),
                io.String.Input("class_noun", default="person",
                                tooltip="What the subject is ('person', 'dog', 'backpack'). A wrong or missing "
                                        "class noun hurts fidelity badly (paper: DINO 0.744 vs 0.454 / 0.303)."),
                io.Boolean.Input("prior_preservation", default=True,
                                 tooltip="Also train on class pictures from the frozen model so 'a person' still "
                                         "gives varied people (prevents language drift)."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="lambda in loss = instance + lambda * prior (paper: 1)."),
                io.Int.Input("num_class_images", default=100, min=1, max=2000,
                             tooltip="Class pictures generated when none are given (paper ~1000, common 100-300). "
                                     "Generated once and cached."),
                io.Combo.Input("mode", options=["LoRA", "full fine-tune"], default="LoRA",
                               tooltip="LoRA on the attention projections (small file, lr 1e-4) or every UNet "
                                       "weight (best fidelity, lr 5e-6, saves a checkpoint, much more memory)."),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="LoRA rank r: capacity of the update."),
                io.Float.Input("lora_alpha", default=16.0, min=0.1, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also train a LoRA on the text encoder's attention (better identity, more "
                                         "drift risk)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6,
                               tooltip="UNet step size (paper: 5e-6 full fine-tune; 1e-4 for LoRA)."),
                io.Float.Input("text_encoder_lr", default=5e-5, min=1e-8, max=1.0, step=1e-6,
                               tooltip="Text-encoder LoRA step size."),
                io.Int.Input("steps", default=800, min=1, max=100000,
                             tooltip="Steps (paper: 400 without, 800 with prior preservation)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Instance pictures per step (as many class pictures are added)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training size: 512 for SD1.5, 1024 for SDXL."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, ~30% slower."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds LoRA init, class pictures, noise and noise levels."),
                io.String.Input("output_name", default="storykit_dreambooth",
                                tooltip="File name in loras/ (LoRA) or checkpoints/ (full); never overwrites."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Your own class pictures; when not connected they are generated."),
                io.Int.Input("class_sample_steps", default=25, min=1, max=150, optional=True,
                             tooltip="Sampler steps for generated class pictures (euler, normal)."),
                io.Float.Input("class_cfg", default=7.0, min=1.0, max=30.0, step=0.5, optional=True,
                               tooltip="CFG for generated class pictures."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto", optional=True,
                               tooltip="auto: bf16 autocast on GPUs that support it, else fp32."),
                io.Int.Input("save_every", default=200, min=0, max=100000, optional=True,
                             tooltip="Checkpoint every N steps into <folder>/storykit_checkpoints (0: only at the "
                                     "end). Cancel also keeps the last finished step."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="A LoRA checkpoint's file name in loras/ or loras/storykit_checkpoints to continue "
                                        "from (empty: start fresh); paths out of those folders are refused."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The trained model for the rest of this graph."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP (with its LoRA when the text encoder trained)."),
                io.String.Output(display_name="file", tooltip="The saved LoRA or checkpoint file name."),
                io.Image.Output(display_name="loss_curve", tooltip="Total, instance and prior loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, instance_images, identifier, class_noun, prior_preservation, prior_weight,
                num_class_images, mode, lora_rank, lora_alpha, train_text_encoder, learning_rate, text_encoder_lr,
                steps, batch_size, resolution, gradient_checkpointing, seed, output_name, class_images=None,
                class_sample_steps=25, class_cfg=7.0, precision="auto", save_every=200,
                resume_from="") -> io.NodeOutput:
        node = "StoryKit Train DreamBooth"
        _check_images(node, instance_images, "instance_images")
        if not class_noun.strip():
            raise ValueError(f"{node}: class_noun is empty; name what the subject is ('person', 'dog'); the paper "
                             "shows fidelity collapses without it")
        class_latents = None
        if prior_preservation:
            if class_images is not None:
                class_latents = _encode_class_images(vae, class_images, resolution)
            else:
                class_latents = class_prior_latents(model, clip, f"a {class_noun}", num_class_images, resolution,
                                                    seed, class_sample_steps, class_cfg)
        out_model, out_clip, path, history = train_dreambooth(
            model, clip, vae, instance_images, identifier=identifier.strip(), class_noun=class_noun.strip(),
            prior_preservation=prior_preservation, prior_weight=prior_weight, class_latents=class_latents, mode=mode,
            rank=lora_rank, alpha=lora_alpha, train_text_encoder=train_text_encoder, learning_rate=learning_rate,
            text_encoder_lr=text_encoder_lr, steps=steps, batch_size=batch_size, resolution=resolution,
            gradient_checkpointing=gradient_checkpointing, seed=seed, precision=precision, save_every=save_every,
            resume_from=resume_from, name=output_name, node=node)
        return io.NodeOutput(out_model, out_clip, path.name, _finish_image(history))


@torch.no_grad()
def _encode_class_images(vae, images, resolution):
    return vae.encode(tr.fit_images(images, resolution).movedim(1, -1)).float()


# ---------------------------------------------------------------------------------------------- identifiers
def rare_identifiers(clip, count: int, min_letters: int = 3, max_letters: int = 3, pool: int = 4) -> list[str]:
    """Short words that are ONE token in every encoder of this CLIP and carry a weak prior, weakest first.

    Ruiz et al. pick rare tokens and decode them to text. Candidates: the latest BPE merges (a high id is a rare
    merge) that are single lower-case tokens; then `pool` x count of them are ranked by how far the word moves the
    prompt "a photo of a" in this text encoder's pooled output (a strong prior, like 'dbz', moves it far).
    """
    keys = _sub_encoders(clip)
    subs = [getattr(clip.tokenizer, f"clip_{k}") for k in keys]
    vocab = subs[0].tokenizer.get_vocab()
    found = []
    for piece, _ in sorted(vocab.items(), key=lambda kv: -kv[1]):
        word = piece[:-4] if piece.endswith("</w>") else None
        if not word or not (min_letters <= len(word) <= max_letters) or not word.isascii() or not word.isalpha():
            continue
        if not word.islower():
            continue
        if all(len(s.tokenizer(word)["input_ids"][s.tokens_start:-1]) == 1 for s in subs):
            found.append(word)
        if len(found) >= pool * count:
            break
    with torch.no_grad():
        base = _encode(clip, _tokenize(clip, clip.tokenizer, "a photo of a"))
        if base[1] is None:
            return found[:count]

        def prior_strength(word: str) -> float:
            pooled = _encode(clip, _tokenize(clip, clip.tokenizer, f"a photo of a {word}"))[1]
            return float(1 - torch.nn.functional.cosine_similarity(pooled.float(), base[1].float()).mean())

        scored = sorted(found, key=prior_strength)
    return scored[:count]


class StoryKitRareIdentifiers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitRareIdentifiers",
            display_name="Propose Rare Identifiers (StoryKit)",
            category="StoryKit/train",
            description="Suggests DreamBooth identifiers for this model: short words that are a single rare token "
                        "(late BPE merge), ranked by how little they move the text encoder's reading of 'a photo "
                        "of a' (weak prior). English words and random letters split into strong tokens.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP whose tokenizer the identifier must suit."),
                io.Int.Input("count", default=10, min=1, max=200, tooltip="How many candidates to list."),
                io.Int.Input("letters", default=3, min=2, max=6,
                             tooltip="Length of the candidates (the paper and 'sks' use 3)."),
            ],
            outputs=[
                io.String.Output(display_name="identifier", tooltip="The best candidate."),
                io.String.Output(display_name="candidates", tooltip="All candidates, comma separated."),
            ],
        )

    @classmethod
    def execute(cls, clip, count, letters) -> io.NodeOutput:
        found = rare_identifiers(clip, count, letters, letters)
        if not found:
            raise ValueError(f"StoryKit Propose Rare Identifiers: no single-token {letters}-letter words in this "
                             "tokenizer; try letters=3")
        return io.NodeOutput(found[0], ", ".join(found))


NODES = [StoryKitTrainTextualInversion, StoryKitTrainDreamBooth, StoryKitRareIdentifiers]
