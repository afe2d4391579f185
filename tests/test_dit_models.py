"""The tiny DiT test models (runner/ditmodels.py) are the host's own families: real model classes, samplers,
tokenizers, encode paths and attention routing; and --tiny-model substitutes the stock loaders of their graphs."""
from __future__ import annotations

import pytest
import torch

from storykit.runner import cli, testmodels
from storykit.runner import convert as conv

# Per family: host model class, text-encoder loader as ComfyUI's template loads it, a word and its ids in the real
# tokenizer (key of clip.tokenize's dict), the context layer (its in_features = the encoder's output width), the
# empty-latent node, guidance, and how many attention calls one forward makes (joint attention sites).
T5_FOX = [3, 9, 1131, 3, 20400, 1]                      # T5 sentencepiece: "a red fox" + </s>
CLIP_FOX = [49406, 320, 736, 3240, 49407]              # CLIP BPE: <|startoftext|> a red fox <|endoftext|>
QWEN_FOX = [151644, 872, 198, 64, 2518, 38835, 151645]  # Qwen2 BPE: <|im_start|>user\n a red fox <|im_end|>
MISTRAL_FOX = [3, 1097, 1329, 1512, 4]                   # tiny tekken (ditmodels): [INST] a red fox [/INST]
FAMILIES = {
    "flux": {
        "config": "Flux", "model_class": "Flux", "sampling": "ModelSamplingFlux",
        "clip_loader": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                           "type": "flux", "device": "default"}),
        "unet": "flux1-dev.safetensors", "vae": "ae.safetensors",
        "tokens": {"l": CLIP_FOX, "t5xxl": T5_FOX}, "context": "txt_in", "pooled": "vector_in.in_layer",
        "latent": "EmptySD3LatentImage", "channels": 16, "guidance": 3.5, "cfg": 1.0,
        "block_keys": [("double", 0), ("double", 1), ("single", 0), ("single", 1)],
    },
    "flux2": {
        "config": "Flux2", "model_class": "Flux2", "sampling": "ModelSamplingFlux",
        "clip_loader": ("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2",
                                       "device": "default"}),
        "unet": "flux2_dev_fp8mixed.safetensors", "vae": "full_encoder_small_decoder.safetensors",
        "tokens": {"mistral3_24b": [1, 17], "mistral3_24b ": MISTRAL_FOX}, "context": "txt_in",
        "latent": "EmptyFlux2LatentImage", "channels": 128, "guidance": 4.0, "cfg": 1.0,
        "block_keys": [("double", 0), ("double", 1), ("single", 0), ("single", 1)],
    },
    "chroma": {
        "config": "Chroma", "model_class": "Chroma", "sampling": "ModelSamplingFlux",
        "clip_loader": ("CLIPLoader", {"clip_name": "t5xxl_fp8_e4m3fn_scaled.safetensors", "type": "chroma",
                                       "device": "default"}),
        "unet": "Chroma1-HD-fp8mixed.safetensors", "vae": "ae.safetensors",
        "tokens": {"t5xxl": T5_FOX}, "context": "txt_in", "latent": "EmptySD3LatentImage", "channels": 16,
        "cfg": 3.5, "block_keys": [("double", 0), ("double", 1), ("single", 0), ("single", 1)],
    },
    "qwen_image": {
        "config": "QwenImage", "model_class": "QwenImage", "sampling": "ModelSamplingFlux",
        "clip_loader": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                                       "device": "default"}),
        "unet": "qwen_image_fp8_e4m3fn.safetensors", "vae": "qwen_image_vae.safetensors",
        "tokens": {"qwen25_7b": [151644, 8948, 198], "qwen25_7b ": QWEN_FOX[1:]}, "context": "txt_in",
        "latent": "EmptySD3LatentImage", "channels": 16, "cfg": 4.0, "block_keys": [("double", 0), ("double", 1)],
    },
    "z_image": {
        "config": "ZImage", "model_class": "Lumina2", "sampling": "ModelSamplingDiscreteFlow",
        "clip_loader": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}),
        "unet": "z_image_turbo_bf16.safetensors", "vae": "ae.safetensors",
        "tokens": {"qwen3_4b": QWEN_FOX + [198, 151644, 77091, 198]}, "context": "cap_embedder.1",
        "latent": "EmptySD3LatentImage", "channels": 16, "cfg": 1.0,
        # context refiner x2, noise refiner x2 (no block ids from the host), then the 2 joint layers
        "block_keys": [(None, None)] * 6,
    },
    "sd3": {
        "config": "SD3", "model_class": "SD3", "sampling": "ModelSamplingDiscreteFlow",
        "checkpoint": "sd3.5_large_fp8_scaled.safetensors",
        "tokens": {"l": CLIP_FOX, "g": CLIP_FOX, "t5xxl": T5_FOX}, "context": "context_embedder",
        "pooled": "y_embedder.mlp.0", "latent": "EmptySD3LatentImage", "channels": 16, "cfg": 4.0,
        "block_keys": [(None, None)] * 2,
    },
}
KINDS = sorted(FAMILIES)


def _module(model, dotted: str):
    module = model.model.diffusion_model
    for name in dotted.split("."):
        module = module[int(name)] if name.isdigit() else getattr(module, name)
    return module


def _ids(tokens: list) -> list:
    return [t[0] if isinstance(t, tuple) else t for t in tokens]


@pytest.mark.parametrize("kind", KINDS)
def test_family_is_the_hosts_own_with_its_real_tokenizer_and_context_width(host, kind):
    import comfy.model_base
    import comfy.model_sampling
    fam = FAMILIES[kind]
    model, clip, vae = testmodels.tiny_models(kind, 0)
    assert isinstance(model.model, getattr(comfy.model_base, fam["model_class"]))
    assert type(model.model.model_config).__name__ == fam["config"]
    # get_model_object: the model may be loaded with another clone's patches (ModelSamplingAuraFlow in a workflow)
    assert isinstance(model.get_model_object("model_sampling"), getattr(comfy.model_sampling, fam["sampling"]))
    assert vae.latent_channels == fam["channels"]
    tokens = clip.tokenize("a red fox")
    for key, ids in fam["tokens"].items():
        got = _ids(tokens[key.strip()][0])
        assert any(got[i:i + len(ids)] == ids for i in range(len(got))), (key, got[:48])
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox in the snow"))
    context, extra = cond[0]
    assert context.shape[-1] == _module(model, fam["context"]).in_features
    if fam.get("pooled"):
        assert extra["pooled_output"].shape[-1] == _module(model, fam["pooled"]).in_features
    assert torch.isfinite(context).all()


@pytest.mark.parametrize("kind", KINDS)
def test_samples_through_the_hosts_sampler_with_attention_routed_to_the_override(host, kind):
    import comfy.sample
    import node_helpers
    fam = FAMILIES[kind]
    model, clip, vae = testmodels.tiny_models(kind, 0)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox in the snow"))
    negative = [[torch.zeros_like(c), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in extra.items()}]
                for c, extra in positive]  # as ConditioningZeroOut, which the templates use
    if fam.get("guidance") is not None:
        positive = node_helpers.conditioning_set_values(positive, {"guidance": fam["guidance"]})
    latent_node = host.nodes.NODE_CLASS_MAPPINGS[fam["latent"]]
    latent = _node_output(latent_node, width=64, height=64, batch_size=1)[0]["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model, latent)  # as the sampler nodes do (Wan latents are 5D)
    assert latent.shape[1] == fam["channels"]
    calls = []

    def counting(func, *args, **kwargs):
        opts = kwargs["transformer_options"]
        calls.append({"q": tuple(args[0].shape), "k": tuple(args[1].shape), "heads": args[3] if len(args) > 3 else kwargs["heads"],
                      "skip_reshape": kwargs.get("skip_reshape", False), "block": (opts.get("block_type"),
                                                                                   opts.get("block_index")),
                      "keys": set(opts)})
        return func(*args, **kwargs)

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(patched, noise, 2, fam["cfg"], "euler", "simple", positive, negative, latent, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    per_forward = len(fam["block_keys"])
    assert [c["block"] for c in calls[:per_forward]] == fam["block_keys"]
    # One call per attention site per model call; every row of every batch is seen once per step (cond and uncond
    # rows are batched when their text lengths match, else run one after the other; cfg 1 skips uncond).
    rows_per_step = 1 if fam["cfg"] == 1.0 else 2
    assert sum(c["q"][0] for c in calls) == 2 * rows_per_step * per_forward
    assert all({"cond_or_uncond", "sigmas"} <= c["keys"] for c in calls)


def _node_output(node_class, **inputs):
    result = node_class.execute(**inputs)
    return tuple(result.result if hasattr(result, "result") else result)


def _template_prompt(kind: str) -> dict:
    """A text-to-image graph with the loaders, file names and sampler nodes of ComfyUI's own template."""
    fam = FAMILIES[kind]
    if fam.get("checkpoint"):
        loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fam["checkpoint"]}}}
        clip, vae = ["1", 1], ["1", 2]
    else:
        clip_node, clip_inputs = fam["clip_loader"]
        loaders = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": fam["unet"], "weight_dtype": "default"}},
                   "2": {"class_type": clip_node, "inputs": dict(clip_inputs)},
                   "3": {"class_type": "VAELoader", "inputs": {"vae_name": fam["vae"]}}}
        clip, vae = ["2", 0], ["3", 0]
    prompt = {
        **loaders,
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": clip}},
        "5": {"class_type": fam["latent"], "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 2,
                                                         "denoise": 1.0}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["9", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["5", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": vae}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"tiny_{kind}"}},
    }
    if fam.get("guidance") is not None:
        prompt["13"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": fam["guidance"]}}
        prompt["9"] = {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["13", 0]}}
    else:
        prompt["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
        prompt["9"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0],
                                                             "negative": ["13", 0], "cfg": fam["cfg"]}}
    return prompt


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_substitutes_the_templates_loaders(host, run_workflow, tmp_path, kind):
    """A graph laid out like ComfyUI's own template for the family runs on its tiny models (FLUX.1 through
    `python -m storykit run --tiny-model flux`, the others through the tests' run_workflow: one substitution)."""
    import json
    prompt = _template_prompt(kind)
    if kind == "flux":
        path, api = tmp_path / "flux_api.json", tmp_path / "ran.json"
        path.write_text(json.dumps(prompt))
        assert cli.main(["run", str(path), "--tiny-model", "flux", "--output", str(tmp_path), "--quiet",
                         "--save-api", str(api)]) == 0
        assert len(list(tmp_path.glob("tiny_flux*.png"))) == 1
        prompt = json.loads(api.read_text())
    else:
        result = run_workflow(prompt, tiny_model=kind)
        assert {"1", "10", "11", "12"} <= set(result.ran)
        cli.substitute_tiny_models(host.nodes, prompt, kind)
    if FAMILIES[kind].get("checkpoint"):
        assert prompt["1"]["class_type"] == cli.TINY_NODES["checkpoint"]
    else:
        assert [prompt[n]["class_type"] for n in "123"] == [cli.TINY_NODES[r] for r in ("model", "clip", "vae")]
    assert prompt["1"]["inputs"] == {"kind": kind, "seed": 0}


def test_tiny_model_refuses_a_graph_of_another_family(host):
    prompt = _template_prompt("flux")
    with pytest.raises(conv.WorkflowError, match=r"node 2 \(DualCLIPLoader\).*type 'flux'.*--tiny-model flux"):
        cli.substitute_tiny_models(host.nodes, prompt, "sdxl")
    assert prompt["2"]["class_type"] == "DualCLIPLoader", "nothing half-substituted"
    with pytest.raises(conv.WorkflowError, match="no loader node"):
        cli.substitute_tiny_models(host.nodes, {"1": {"class_type": "EmptySD3LatentImage", "inputs": {}}}, "flux")


def test_flux2_tiny_tokenizer_gives_the_ids_of_the_hosts_own_tokenizer(host):
    """The tiny FLUX.2 CLIP tokenizes as ComfyUI 0.3.75's unmodified Flux2Tokenizer does on transformers 4 (ids
    recorded by tools/flux2_tokenizer_reference.py), padding included (pad 11 on the left, Story Prompt's option)."""
    import hashlib
    import json
    from pathlib import Path

    from storykit.runner import ditmodels
    ref = json.loads((Path(__file__).parent / "data" / "flux2_tiny_tekken_ids.json").read_text(encoding="utf-8"))
    assert hashlib.sha256(ditmodels.tiny_tekken_json()).hexdigest() == ref["tekken_sha256"], \
        "the tiny tekken vocabulary changed: re-run tools/flux2_tokenizer_reference.py"
    clip = testmodels.tiny_models("flux2", 0)[1]
    for text, ids in ref["ids"].items():
        assert _ids(clip.tokenize(text)["mistral3_24b"][0]) == ids, text
    padded = ref["padded"]
    options = {"tokenizer_options": {"mistral3_24b_min_length": padded["min_length"]}}
    assert _ids(clip.tokenize(padded["text"], **options)["mistral3_24b"][0]) == padded["ids"]
    assert clip.tokenizer.state_dict()["tekken_model"] is not None  # saved with the CLIP as the host saves it


def test_hosts_flux2_tokenizer_still_needs_transformers_4(host):
    """Why the tiny FLUX.2 tokenizer converts the vocabulary itself: ComfyUI 0.3.75 calls transformers 4's
    MistralConverter(vocab=...), which transformers 5 does not take (real FLUX.2 text-encoder files fail the same
    way). When this stops failing, the host's own Mistral3Tokenizer can be used as it is (ditmodels)."""
    import comfy.text_encoders.flux as flux
    import transformers

    from storykit.runner import ditmodels
    if int(transformers.__version__.split(".")[0]) < 5:
        flux.Flux2Tokenizer(tokenizer_data=ditmodels.tiny_tekken_tokenizer_data())
    else:
        with pytest.raises(TypeError, match="vocab_file"):
            flux.Flux2Tokenizer(tokenizer_data=ditmodels.tiny_tekken_tokenizer_data())


def test_flux2_samples_and_decodes_its_128_channel_latent(host):
    """FLUX.2: the host's Flux2 class (4 RoPE axes, global modulation, patch 1) on EmptyFlux2LatentImage's latent, with
    the tiny Mistral encoder's conditioning (3 hidden states stacked), text padded to 512 by the model."""
    import comfy.sample
    model, clip, vae = testmodels.tiny_models("flux2", 0)
    latent = _node_output(host.nodes.NODE_CLASS_MAPPINGS["EmptyFlux2LatentImage"], width=32, height=32,
                          batch_size=1)[0]["samples"]
    assert latent.shape == (1, 128, 2, 2) and vae.latent_channels == 128
    tokens = clip.tokenize("a red fox")
    context = clip.encode_from_tokens_scheduled(tokens)[0][0]
    # every token (<s>, the system prompt, [INST] a red fox [/INST]): hidden states 10, 20 and 30 side by side
    assert context.shape == (1, len(tokens["mistral3_24b"][0]), 3 * 64)
    cond = [[context, {"pooled_output": None, "guidance": 4.0}]]
    blocks = []

    def counting(func, *args, **kwargs):
        opts = kwargs["transformer_options"]
        blocks.append((opts["block_type"], opts["block_index"], tuple(args[0].shape)))
        return func(*args, **kwargs)

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting
    out = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 2, 1.0, "euler", "simple", cond, cond,
                              latent, seed=0)
    assert torch.isfinite(out).all()
    assert [b[:2] for b in blocks[:4]] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    assert blocks[0][2] == (1, 2, 512 + 4, 32)  # [B, heads, text (padded to 512 by model_base.Flux2) + image, D]
    image = vae.decode(out)
    assert image.shape[-3:-1] == (32, 32) and torch.isfinite(image).all()
