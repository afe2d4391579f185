"""Tiny random-weight DiT models (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image, SD3.5) from the host's own classes.

Each family is built from its `comfy.supported_models` config class (so the model is the real `comfy.model_base`
class, with the family's model_sampling, latent format and text-encoder target), with the real layout scaled down
consistently: few double/single blocks, 2-4 heads, head dim and RoPE axes divided by the same factor. The text
encoders are the host's own classes and tokenizers (shipped in the host tree), shrunk with the host's
`<model_name>_model_config` option, so prompts go through `clip.tokenize` + `clip.encode_from_tokens` unchanged.
VAEs are host VAEs detected from their state dict (see `build_vae`). Seeded: runner.testmodels.init_random.
Import the host first (runner.host.boot()).
"""
from __future__ import annotations

import functools
import logging

DIT_KINDS = ("flux", "flux2", "chroma", "qwen_image", "z_image", "sd3")

# Text encoders: the host's configs with smaller widths (vocabularies stay real, so the real tokenizers fit).
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
TINY_CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
               "projection_dim": 64}

# FLUX.1 dev: hidden 3072 = 24 heads x 128, RoPE axes (16, 56, 56); here 2 heads x 32, axes / 4.
FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TINY_CLIP_L["hidden_size"],
    "context_in_dim": TINY_T5["d_model"], "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
    "depth_single_blocks": 2, "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2, "qkv_bias": True,
    "guidance_embed": True,
}


def _target_and_options(kind: str, model_config):
    """The host's text-encoder target for the family and the model_options that shrink it."""
    if kind == "flux":
        return model_config.clip_target(), {"t5xxl_model_config": TINY_T5, "clip_l_model_config": TINY_CLIP_L}
    raise ValueError(f"unknown DiT test model kind {kind!r}: use one of {', '.join(DIT_KINDS)}")


def _model_config(kind: str):
    import comfy.supported_models as sm
    import torch
    table = {"flux": (sm.Flux, FLUX)}
    if kind not in table:
        raise ValueError(f"unknown DiT test model kind {kind!r}: use one of {', '.join(DIT_KINDS)}")
    cls, unet = table[kind]
    cfg = cls({**unet, "dtype": torch.float32})
    cfg.unet_config.update({**unet, "dtype": torch.float32})
    return cfg


def build_dit(kind: str, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher

    from .testmodels import init_random
    cfg = _model_config(kind)
    model = cfg.get_model({}, device=mm.unet_offload_device())
    init_random(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_dit_clip(kind: str, seed: int, embedding_directory=None):
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    import torch

    from .testmodels import init_random
    target, options = _target_and_options(kind, _model_config(kind))
    if embedding_directory is None:
        embedding_directory = folder_paths.get_folder_paths("embeddings")
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={**options, "dtype": torch.float32,
                                        "initial_device": mm.text_encoder_offload_device()})
    init_random(clip.cond_stage_model, seed)
    return clip


# Which host VAE layout each family's latent comes from.
VAE_LAYOUTS = {"flux": "ae16", "chroma": "ae16", "z_image": "ae16", "sd3": "ae16"}


def build_dit_vae(kind: str, seed: int):
    """The family's VAE; families with the same latent layout share one (cached) VAE."""
    if kind not in VAE_LAYOUTS:
        raise ValueError(f"unknown DiT test model kind {kind!r}: use one of {', '.join(DIT_KINDS)}")
    return _vae(VAE_LAYOUTS[kind], seed)


@functools.lru_cache(maxsize=4)
def _vae(layout: str, seed: int):
    """A host VAE detected by comfy.sd.VAE from its state-dict layout.

    "ae16" (FLUX.1, Chroma, Z-Image, SD3.5: AutoencodingEngine, 16 channels, no quant convs): the host's detection
    fixes its widths (ch 128, ch_mult 1-2-4-4, 2 res blocks), so it is full width here; only the weights are random.
    """
    import comfy.sd
    import torch

    from .testmodels import init_random
    if layout == "ae16":
        # The keys the host's detection reads: 16 latent channels, four levels (8x down).
        probe = {"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
                 "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3)}
    logging.disable(logging.WARNING)  # the host lists every key the probe lacks: all of them are seeded next
    try:
        vae = comfy.sd.VAE(sd=probe)
    finally:
        logging.disable(logging.NOTSET)
    init_random(vae.first_stage_model, seed)
    vae.first_stage_model.to(vae.vae_dtype)
    return vae
