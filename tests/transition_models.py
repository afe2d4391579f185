"""Seeded tiny random-weight video models of the real layouts, from the host's own classes (for transition tests).

- Wan 2.1 image-to-video and first/last-frame (WAN21 with `img_emb`; FLF with the 514-token `emb_pos`), text width 768
  so the tiny CLIP-L text encoder of runner.testmodels drives it; a small Wan 2.1 VAE (4x temporal, 8x spatial).
- SVD img2vid (temporal UNet, context 1024, ADM 768) with the tiny SD VAE.
- A CLIP vision model with ViT-H widths (1280 hidden, 1024 projection) but 2 layers and 56px input (17 tokens).
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

WAN_TINY = {"image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 36,
            "dim": 64, "ffn_dim": 128, "freq_dim": 256, "text_dim": 768, "out_dim": 16, "num_heads": 4,
            "num_layers": 2, "eps": 1e-6}

SVD_TINY = {"image_size": 32, "in_channels": 8, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
            "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1, "context_dim": 1024, "use_spatial_transformer": True, "legacy": False,
            "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16, "adm_in_channels": 768, "num_classes": "sequential",
            "use_temporal_attention": True, "use_temporal_resblock": True, "extra_ff_mix_layer": True,
            "use_spatial_context": True, "merge_strategy": "learned_with_images", "merge_factor": 0.0,
            "video_kernel_size": [3, 1, 1], "disable_temporal_crossattention": False}

CLIP_VISION_TINY = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1280,
                    "image_size": 56, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 256,
                    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
                    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 1024}


def _init(module, seed: int, std: float = 0.02) -> None:
    """runner.testmodels.init_random, plus Wan's RMS norms (`gamma`) and modulations set like trained ones."""
    import torch

    from storykit.runner.testmodels import init_random
    init_random(module, seed, std)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@functools.lru_cache(maxsize=4)
def wan(flf: bool = False, seed: int = 0):
    """MODEL: a tiny Wan 2.1 i2v (or first/last-frame, emb_pos of 514 tokens) WAN21 of the real layout."""
    import comfy.model_management
    import comfy.supported_models
    import torch
    unet = dict(WAN_TINY, dtype=torch.float32)
    if flf:
        unet["flf_pos_embed_token_number"] = 514
    cfg = comfy.supported_models.WAN21_I2V(unet)
    cfg.unet_config.update(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=comfy.model_management.unet_offload_device())
    _init(model.diffusion_model, seed)
    with torch.no_grad():  # image tokens must matter as much as text in a random model
        for block in model.diffusion_model.blocks:
            block.cross_attn.k_img.weight.mul_(20)
            block.cross_attn.v_img.weight.mul_(20)
    return _patcher(model)


@functools.lru_cache(maxsize=2)
def svd(seed: int = 0):
    import comfy.model_management
    import comfy.supported_models
    import torch
    unet = dict(SVD_TINY, dtype=torch.float32)
    cfg = comfy.supported_models.SVD_img2vid(unet)
    cfg.unet_config.update(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=comfy.model_management.unet_offload_device())
    _init(model.diffusion_model, seed)
    return _patcher(model)


@functools.lru_cache(maxsize=2)
def wan_vae(seed: int = 0):
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE
    module = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0)
    _init(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


@functools.lru_cache(maxsize=2)
def clip_vision(seed: int = 0):
    import comfy.clip_vision
    path = Path(tempfile.mkdtemp(prefix="storykit-clipvision-")) / "config.json"
    path.write_text(json.dumps(CLIP_VISION_TINY))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    _init(cv.model, seed)
    return cv


@functools.lru_cache(maxsize=1)
def text_clip(seed: int = 1):
    """The tiny CLIP-L text encoder (768 wide) that the tiny Wan's text_dim takes."""
    from storykit.runner.testmodels import build_clip
    return build_clip("sd15", seed)
