"""Tiny random-weight DiT models (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image, SD3.5) from the host's own classes.

Each family is built from its `comfy.supported_models` config class (so the model is the real `comfy.model_base`
class, with the family's model_sampling, latent format and text-encoder target), with the real layout scaled down
consistently: few double/single blocks, 2-4 heads, head dim and RoPE axes divided by the same factor. The text
encoders are the host's own classes and tokenizers (shipped in the host tree), shrunk with the host's
`<model_name>_model_config` option, so prompts go through `clip.tokenize` + `clip.encode_from_tokens` unchanged.
VAEs are host VAEs detected from their state dict (see `_vae`). Seeded: runner.testmodels.init_random.
FLUX.2 has no tiny text encoder: its Mistral tekken vocabulary is not in the host tree, and ComfyUI 0.3.75's
converter call does not match transformers 5.23 (FLUX2_TOKENIZER_MISSING). Import the host first (runner.host.boot()).
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

# Chroma (FLUX.1 schnell layout without CLIP, guidance and vector_in; a distilled modulation approximator): same
# scaling as FLUX; in_channels is the patchified 16 x 2 x 2; the approximator's out_dim is the hidden size.
CHROMA = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": TINY_T5["d_model"],
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [4, 14, 14], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
    "hidden_dim": 64, "n_layers": 2,
}

# Causal LLM text encoders (comfy.text_encoders.llama): head_dim stays the host's 128 (a class attribute there);
# 3 layers, since Z-Image reads the second-to-last hidden state.
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
            "num_key_value_heads": 1}

# FLUX.2 dev: hidden 6144 = 48 heads x 128, 4 RoPE axes of 32, 128-channel latent (32 x 2 x 2, patch 1), global
# modulation, Mistral-3 context = 3 hidden states x 5120 stacked; here 2 heads x 32, axes / 4, context 3 x 64.
FLUX2 = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 3 * 64,
    "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0,
}
# The host's Mistral-3 encoder reads hidden states 10, 20 and 30: 31 layers (64 wide) are the fewest that have them.
TINY_MISTRAL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 31, "num_attention_heads": 2,
                "num_key_value_heads": 1}

# Qwen-Image: 60 blocks, 24 heads x 128, RoPE axes (16, 56, 56), Qwen2.5-VL 7B context 3584; here 2 x 32, axes / 4.
QWEN_IMAGE = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": TINY_LLM["hidden_size"],
    "axes_dims_rope": [4, 14, 14],
}

# Z-Image (Lumina2 NextDiT): dim 3840 = 30 heads x 128, RoPE axes (32, 48, 48), Qwen3-4B caption width 2560;
# here 2 heads x 128 with the real axes (the host's Z-Image modulation is 256 wide, so dim >= 256), 2 main layers and
# 2 + 2 refiner layers.
Z_IMAGE = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": TINY_LLM["hidden_size"],
    "n_layers": 2, "n_refiner_layers": 2, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
    "time_scale": 1000.0, "pad_tokens_multiple": 32,
}

# SD3.5 Large (MMDiT: hidden = 64 x depth, heads = depth, head dim 64): 2 joint blocks, hidden 128. Its text encoders
# keep their real output widths (the host's SD3 encoder pads CLIP-L+G to T5's 4096 and pools 768 + 1280).
SD3 = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "pos_embed_max_size": 192, "num_patches": 36864, "pos_embed_scaling_factor": None, "qk_norm": "rms",
}
TINY_T5_4096 = {**TINY_T5, "d_model": 4096}


FLUX2_TOKENIZER_MISSING = (
    "FLUX.2's text encoder (Mistral 3 Small) tokenizes with Mistral's tekken vocabulary, which ComfyUI 0.3.75 does "
    "not ship: it reads it from the text-encoder file (tokenizer_data['tekken_model']), and its converter call "
    "(MistralConverter(vocab=...)) fails with the pinned transformers 5.23 (MistralConverter(vocab_file)). No tiny "
    "FLUX.2 text encoder; the tiny FLUX.2 MODEL and VAE work (context width 3 x 64).")


def _target_and_options(kind: str, model_config):
    """The host's text-encoder target for the family and the model_options that shrink it."""
    if kind == "flux2":
        raise NotImplementedError(FLUX2_TOKENIZER_MISSING)
    if kind == "flux":
        return model_config.clip_target(), {"t5xxl_model_config": TINY_T5, "clip_l_model_config": TINY_CLIP_L}
    if kind == "chroma":
        return model_config.clip_target(), {"t5xxl_model_config": TINY_T5}
    if kind == "z_image":
        return model_config.clip_target(), {"qwen3_4b_model_config": TINY_LLM}
    if kind == "qwen_image":
        return _tiny_qwen_image_target(), {"qwen25_7b_model_config": TINY_LLM}
    if kind == "sd3":
        import comfy.supported_models_base
        import comfy.text_encoders.sd3_clip as sd3_clip

        from .testmodels import TINY_CLIP_G, TINY_CLIP_L as CLIP_L_768
        target = comfy.supported_models_base.ClipTarget(
            sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True))
        keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim")
        return target, {"t5xxl_model_config": TINY_T5_4096,
                        "clip_l_model_config": {k: CLIP_L_768[k] for k in keep},
                        "clip_g_model_config": {k: TINY_CLIP_G[k] for k in keep}}
    raise ValueError(f"unknown DiT test model kind {kind!r}: use one of {', '.join(DIT_KINDS)}")


def _tiny_qwen_image_target():
    """The host's Qwen-Image text encoder (QwenImageTokenizer, QwenImageTEModel and its template-dropping encode)
    with one change: Qwen25_7BVLI hard-codes a full-size vision tower (1280 wide, 32 layers, about 670M weights);
    here the same Qwen2VLVisionTransformer class is built 2 layers deep and 64 wide. Text-only prompts never run it."""
    import comfy.supported_models_base
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.qwen_vl as qwen_vl
    import torch
    from comfy import sd1_clip

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=64, output_hidden_size=config.hidden_size, intermediate_size=128, num_heads=2,
                num_layers=2, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwenVLModel(qwen_image.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):  # noqa: B006 - host signature
            sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    class TinyQwenImageTE(qwen_image.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - host signature
            sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen25_7b",
                                           clip_model=TinyQwenVLModel, model_options=model_options)

    return comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, TinyQwenImageTE)


def _model_config(kind: str):
    import comfy.supported_models as sm
    import torch
    table = {"flux": (sm.Flux, FLUX), "chroma": (sm.Chroma, CHROMA), "qwen_image": (sm.QwenImage, QWEN_IMAGE),
             "z_image": (sm.ZImage, Z_IMAGE), "sd3": (sm.SD3, SD3), "flux2": (sm.Flux2, FLUX2)}
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
    init_random(model.diffusion_model, seed, in_place=True)
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
    init_random(clip.cond_stage_model, seed, in_place=True)
    return clip


# Which host VAE layout each family's latent comes from.
VAE_LAYOUTS = {"flux": "ae16", "chroma": "ae16", "z_image": "ae16", "sd3": "ae16", "qwen_image": "wan21",
               "flux2": "flux2"}


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
    if layout == "wan21":
        # Qwen-Image uses the Wan 2.1 VAE (3D causal convs, 16 channels); the host reads its width from the head's
        # norm: 16 here (real: 96).
        probe = {"decoder.middle.0.residual.0.gamma": torch.zeros(64, 1, 1, 1),
                 "decoder.head.0.gamma": torch.zeros(16, 1, 1, 1)}
    elif layout == "flux2":
        # FLUX.2's VAE: AutoencoderKL (with quant convs) of 32 channels and a batch-norm over 2x2-patchified
        # latents (128 channels, 16x down); widths fixed by the host's detection as for "ae16".
        probe = {"decoder.conv_in.weight": torch.zeros(512, 32, 3, 3), "post_quant_conv.weight": torch.zeros(32, 32, 1, 1),
                 "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3), "bn.running_mean": torch.zeros(128),
                 "bn.running_var": torch.ones(128)}
    elif layout == "ae16":
        # The keys the host's detection reads: 16 latent channels, four levels (8x down).
        probe = {"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
                 "decoder.up.3.upsample.conv.weight": torch.zeros(512, 512, 3, 3)}
    logging.disable(logging.WARNING)  # the host lists every key the probe lacks: all of them are seeded next
    try:
        vae = comfy.sd.VAE(sd=probe)
    finally:
        logging.disable(logging.NOTSET)
    init_random(vae.first_stage_model, seed, in_place=True)
    vae.first_stage_model.to(vae.vae_dtype)
    return vae
