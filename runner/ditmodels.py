"""Tiny random-weight DiT models (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image, SD3.5) from the host's own classes.

Each family is built from its `comfy.supported_models` config class (so the model is the real `comfy.model_base`
class, with the family's model_sampling, latent format and text-encoder target), with the real layout scaled down
consistently: few double/single blocks, 2-4 heads, head dim and RoPE axes divided by the same factor. The text
encoders are the host's own classes and tokenizers (shipped in the host tree), shrunk with the host's
`<model_name>_model_config` option, so prompts go through `clip.tokenize` + `clip.encode_from_tokens` unchanged.
VAEs are host VAEs detected from their state dict (see `_vae`). Seeded: runner.testmodels.init_random.
FLUX.2's Mistral tekken vocabulary is not in the host tree (a real text-encoder file carries it): the tiny one is a
small tekken file built here (`tiny_tekken_json`), handed over as tokenizer_data["tekken_model"] as the host's loader
does; see `_tiny_flux2_target` for the one step transformers 5 needs done differently. Import the host first
(runner.host.boot()).
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


# FLUX.2's tokenizer reads Mistral's tekken.json format: byte-level BPE tokens by rank (base64 bytes), after
# `default_num_special_tokens` special tokens. The tiny one keeps Mistral-3's special-token layout (the host's
# template uses [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18, [INST] 3, [/INST] 4; <s> 1 and <pad> 11) and its 1000
# special ids, then the 256 bytes and the merges a byte-pair trainer finds in TEKKEN_CORPUS (deterministic).
# The pattern is the one ComfyUI 0.3.75's converter call applies whatever the file says (transformers 4's
# MistralConverter default), so the host on transformers 4 builds the same tokenizer from this file.
TEKKEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
TEKKEN_NUM_SPECIAL = 1000
TEKKEN_CORPUS = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object attribution and actions without speculation. a young woman with short red hair, round "
    "glasses and a green raincoat wakes up in a small attic room in the morning light; an old man with a white beard "
    "and a brown tweed jacket feeds the pigeons in a park; they share an umbrella at the tram stop in the rain. a "
    "watercolor illustration of a small red fox wearing a green knitted scarf, reading a book under an oak tree, "
    "running through a snowy forest, sailing a paper boat on a pond, sleeping by a campfire at night. an empty street "
    "at night, wet cobblestones, lamplight.")


@functools.lru_cache(maxsize=1)
def tiny_tekken_json(merges: int = 512) -> bytes:
    """A small, valid tekken.json (UTF-8 bytes): Mistral-3's special tokens, the 256 bytes, then byte-pair merges
    learned from TEKKEN_CORPUS in rank order (at most `merges`; the corpus runs out first)."""
    import base64
    import collections
    import json

    import regex  # a transformers dependency: the pattern's \p{L} classes
    words = collections.Counter(regex.findall(TEKKEN_PATTERN, TEKKEN_CORPUS))
    pieces = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    for _ in range(merges):
        pairs = collections.Counter()
        for w, seq in pieces.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # most frequent; ties by bytes
        if a + b not in known:
            ranks.append(a + b)
            known.add(a + b)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i] == a and seq[i + 1:i + 2] == [b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out
    specials = [*TEKKEN_SPECIALS, *(f"<SPECIAL_{i}>" for i in range(len(TEKKEN_SPECIALS), TEKKEN_NUM_SPECIAL))]
    doc = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(ranks),
                      "default_vocab_size": TEKKEN_NUM_SPECIAL + len(ranks),
                      "default_num_special_tokens": TEKKEN_NUM_SPECIAL, "version": "v7"},
           "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode("ascii"),
                      "token_str": t.decode("utf-8", "replace")} for r, t in enumerate(ranks)],
           "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(specials)]}
    return json.dumps(doc).encode("utf-8")


def tiny_tekken_tokenizer_data() -> dict:
    """tokenizer_data as comfy.sd.load_text_encoder_state_dicts builds it from a FLUX.2 text-encoder file: the
    file's "tekken_model" entry, a uint8 tensor of the tekken.json bytes."""
    import torch
    return {"tekken_model": torch.frombuffer(bytearray(tiny_tekken_json()), dtype=torch.uint8)}


def _target_and_options(kind: str, model_config):
    """The host's text-encoder target for the family and the model_options that shrink it."""
    if kind == "flux2":
        return _tiny_flux2_target(), {"mistral3_24b_model_config": {**TINY_MISTRAL, "vocab_size": _tekken_size()}}
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


def _tekken_size() -> int:
    import json
    return json.loads(tiny_tekken_json())["config"]["default_vocab_size"]


# The host's FLUX.2 prompt template (comfy/text_encoders/flux.py Flux2Tokenizer.llama_template, 0.3.75).
FLUX2_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses "
                  "focusing on object relationships, object\nattribution and actions without speculation."
                  "[/SYSTEM_PROMPT][INST]{}[/INST]")


def _tiny_flux2_target():
    """The host's FLUX.2 text encoder (flux2_te: Mistral3_24BModel, Flux2TEModel's stacking of hidden states 10, 20
    and 30) and its tokenizer classes, with one step done the transformers-5 way.

    ComfyUI 0.3.75's Mistral3Tokenizer converts the tekken vocabulary with
    `MistralConverter(vocab=..., additional_special_tokens=...)`, transformers 4's signature; transformers 5 reads a
    tekken.json path instead (MistralConverter(vocab_file)), so the host's call raises TypeError there, for real
    FLUX.2 files too. Here Mistral3Tokenizer's constructor is the host's with that conversion done by transformers
    5's converter from the same bytes (same vocabulary ids: special ranks first, then byte ranks + 1000; the
    host's wrapper class, LlamaTokenizerFast(legacy=False)); tokenize_with_weights and everything after it are the
    host's. tests/test_dit_models.py checks the ids against the host's own path on transformers 4.57.3."""
    import os
    import tempfile

    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    import torch
    from comfy import sd1_clip

    def tokenizer_args(data):
        from transformers.integrations.mistral import MistralConverter
        if torch.is_tensor(data):
            data = data.numpy().tobytes()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "tekken.json")
            with open(path, "wb") as f:
                f.write(data)
            # add_bos_token: transformers 4's LlamaTokenizerFast default (the host reads <s> from tokenizing "");
            # transformers 5 adds it only when asked
            return {"tokenizer_object": MistralConverter(path).converted(), "legacy": False, "add_bos_token": True}

    class TekkenMistral3Tokenizer(flux.Mistral3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 - host signature
            self.tekken_data = tokenizer_data.get("tekken_model", None)
            sd1_clip.SDTokenizer.__init__(
                self, "", pad_with_end=False, embedding_size=5120, embedding_key="mistral3_24b",
                tokenizer_class=flux.MistralTokenizerClass, has_end_token=False, pad_to_max_length=False,
                pad_token=11, max_length=99999999, min_length=1, pad_left=True,
                tokenizer_args=tokenizer_args(self.tekken_data), tokenizer_data=tokenizer_data)

    class TekkenFlux2Tokenizer(flux.Flux2Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 - host signature
            sd1_clip.SD1Tokenizer.__init__(self, embedding_directory=embedding_directory,
                                           tokenizer_data=tokenizer_data, name="mistral3_24b",
                                           tokenizer=TekkenMistral3Tokenizer)
            self.llama_template = FLUX2_TEMPLATE

    return comfy.supported_models_base.ClipTarget(TekkenFlux2Tokenizer, flux.flux2_te())


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
    tokenizer_data = tiny_tekken_tokenizer_data() if kind == "flux2" else {}
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
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
