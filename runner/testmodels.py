"""Random-weight models for tests and demos: no weights can be downloaded, so they are built in code, seeded.

- `write_random_sd15_checkpoint`: a full-size SD1.5 checkpoint (UNet, CLIP-L, VAE) that the stock
  CheckpointLoaderSimple detects as SD1.5. Pictures are noise; every code path is the real one.
- `tiny_models("sd15" | "sdxl")`: small UNets from the host's own classes with real-width text encoders (CLIP-L 768,
  and CLIP-G 1280 with pooled output for SDXL, so contexts are 768 and 2048 wide), shallow, and a small VAE.
- `tiny_models("flux" | "flux2" | "chroma" | "qwen_image" | "z_image" | "sd3")`: the DiT families, see ditmodels.py.
Every function here imports the host lazily: call runner.host.boot() first.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from ..kernels.safefiles import atomic_save_safetensors

RANDOM_SD15_NAME = "storykit-random-sd15.safetensors"

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

TINY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": True, "num_heads": 2, "num_head_channels": -1, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

_TEXT = {"max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2,
         "pad_token_id": 1, "layer_norm_eps": 1e-5}
TINY_CLIP_L = {**_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 256,
               "num_attention_heads": 4, "num_hidden_layers": 3, "projection_dim": 768}
TINY_CLIP_G = {**_TEXT, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 256,
               "num_attention_heads": 4, "num_hidden_layers": 3, "projection_dim": 1280}

TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def init_random(module, seed: int, std: float = 0.02, in_place: bool = False) -> None:
    """Seeded init for modules built with comfy.ops (which leaves torch.empty): norms 1/0, the rest N(0, std).

    in_place draws straight into each weight (normal_): a different, equally seeded stream, about twice as fast for
    the large DiT-family encoders and VAEs; the default keeps the SD1.5/SDXL test models' weights as they were."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim == 1 and name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and ("norm" in name or "ln_" in name):
                param.fill_(1.0)
            elif name.endswith("logit_scale"):
                param.fill_(4.6052)
            elif in_place:
                param.normal_(0.0, std, generator=gen)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


# ---------------------------------------------------------------------------------------------- text encoders
def _clip_target(kind: str, full: bool):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class Target:
        params = {}

    if kind == "sd15":
        if full:
            Target.clip, Target.tokenizer = comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer
            return Target
        clip_l = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=TINY_CLIP_L)
        Target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=clip_l)
        Target.tokenizer = comfy.sd1_clip.SD1Tokenizer
        return Target

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - host signature
            import torch
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options,
                                                     textmodel_json_config=TINY_CLIP_L)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                device=device, layer="hidden", layer_idx=-2, textmodel_json_config=TINY_CLIP_G, dtype=dtype,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    Target.clip, Target.tokenizer = TinySDXLClip, comfy.sdxl_clip.SDXLTokenizer
    return Target


def build_clip(kind: str, seed: int, full: bool = False, embedding_directory=None):
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import torch
    if embedding_directory is None:
        embedding_directory = folder_paths.get_folder_paths("embeddings")
    device = comfy.model_management.text_encoder_offload_device()
    clip = comfy.sd.CLIP(target=_clip_target(kind, full), embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "initial_device": device})
    init_random(clip.cond_stage_model, seed)
    return clip


# ---------------------------------------------------------------------------------------------- denoisers
def build_unet(kind: str, seed: int, full: bool = False):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    unet = dict(SD15_UNET if full else TINY_UNET)
    unet["dtype"] = torch.float32
    if kind == "sd15":
        cfg = comfy.supported_models.SD15(unet)
        cfg.unet_config.update(unet)
        model = cfg.get_model({}, device=comfy.model_management.unet_offload_device())
    elif kind == "sdxl":
        unet.update({"context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential"})
        cfg = comfy.supported_models.SDXL(unet)
        cfg.unet_config.update(unet)
        model = cfg.get_model({}, device=comfy.model_management.unet_offload_device())
    else:
        raise ValueError(f"unknown test model kind {kind!r}: use 'sd15' or 'sdxl'")
    init_random(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_vae(seed: int, full: bool = False):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = dict(TINY_VAE)
    if full:
        ddconfig.update({"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2})
    module = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_random(module, seed)
    return comfy.sd.VAE(sd=module.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


@functools.lru_cache(maxsize=8)
def tiny_models(kind: str = "sd15", seed: int = 0):
    """(MODEL, CLIP, VAE) of the given family, small and seeded; cached per process (clone before patching)."""
    from . import ditmodels
    if kind in ditmodels.DIT_KINDS:
        return ditmodels.build_dit(kind, seed), ditmodels.build_dit_clip(kind, seed + 1), \
            ditmodels.build_dit_vae(kind, seed + 2)
    return build_unet(kind, seed), build_clip(kind, seed + 1), build_vae(seed + 2)


# ---------------------------------------------------------------------------------------------- full checkpoint
def write_random_sd15_checkpoint(folder: str | os.PathLike, seed: int = 0, name: str = RANDOM_SD15_NAME) -> Path:
    """Write a full-size SD1.5 checkpoint (fp16, about 2 GB) if it is not there yet; return its path."""
    folder = Path(folder)
    target = folder / name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    model = build_unet("sd15", seed, full=True)
    clip = build_clip("sd15", seed + 1, full=True, embedding_directory=[])
    vae = build_vae(seed + 2, full=True)
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    metadata = {"storykit.random_weights": "true", "storykit.seed": str(seed),
                "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "StoryKit random SD1.5"}
    # Atomic: a cancelled write never leaves a half file under the real name.
    atomic_save_safetensors(sd, target, metadata)
    return target
