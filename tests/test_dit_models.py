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
FAMILIES = {
    "flux": {
        "model_class": "Flux", "sampling": "ModelSamplingFlux",
        "clip_loader": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                           "type": "flux", "device": "default"}),
        "unet": "flux1-dev.safetensors", "vae": "ae.safetensors",
        "tokens": {"l": ("fox", [49406, 3240, 49407]), "t5xxl": ("fox", [3, 20400, 1])},
        "context": "txt_in", "pooled": "vector_in.in_layer", "latent": "EmptySD3LatentImage", "channels": 16,
        "guidance": 3.5, "cfg": 1.0, "attention_calls": 4,
        "block_keys": [("double", 0), ("double", 1), ("single", 0), ("single", 1)],
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
    assert isinstance(model.model.model_sampling, getattr(comfy.model_sampling, fam["sampling"]))
    assert vae.latent_channels == fam["channels"]
    for key, (word, ids) in fam["tokens"].items():
        got = _ids(clip.tokenize(word)[key][0])
        assert got[:len(ids)] == ids, (key, got[:8])
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
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if fam.get("guidance") is not None:
        positive = node_helpers.conditioning_set_values(positive, {"guidance": fam["guidance"]})
    latent_node = host.nodes.NODE_CLASS_MAPPINGS[fam["latent"]]
    latent = _node_output(latent_node, width=64, height=64, batch_size=1)[0]["samples"]
    assert latent.shape[1] == fam["channels"]
    calls = []

    def counting(func, *args, **kwargs):
        opts = kwargs["transformer_options"]
        calls.append({"q": tuple(args[0].shape), "k": tuple(args[1].shape), "heads": args[3],
                      "skip_reshape": kwargs.get("skip_reshape", False), "block": (opts.get("block_type"),
                                                                                   opts.get("block_index")),
                      "keys": set(opts)})
        return func(*args, **kwargs)

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(patched, noise, 2, fam["cfg"], "euler", "simple", positive, negative, latent, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert len(calls) % fam["attention_calls"] == 0 and len(calls) >= fam["attention_calls"] * 2
    first = calls[:fam["attention_calls"]]
    if fam.get("block_keys"):
        assert [c["block"] for c in first] == fam["block_keys"]
    assert all({"cond_or_uncond", "sigmas"} <= c["keys"] for c in calls)
    image = vae.decode(out)
    assert image.shape[1:3] == (64, 64) and torch.isfinite(image).all()


def _node_output(node_class, **inputs):
    result = node_class.execute(**inputs)
    return tuple(result.result if hasattr(result, "result") else result)


def _template_prompt(kind: str) -> dict:
    """A text-to-image graph with the loaders, file names and sampler nodes of ComfyUI's own template."""
    fam = FAMILIES[kind]
    clip_node, clip_inputs = fam["clip_loader"]
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": fam["unet"], "weight_dtype": "default"}},
        "2": {"class_type": clip_node, "inputs": clip_inputs},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": fam["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["2", 0]}},
        "5": {"class_type": fam["latent"], "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 2,
                                                         "denoise": 1.0}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 0], "guider": ["9", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["5", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    if fam.get("guidance") is not None:
        prompt["13"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": fam["guidance"]}}
        prompt["9"] = {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["13", 0]}}
    else:
        prompt["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}}
        prompt["9"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0],
                                                             "negative": ["13", 0], "cfg": fam["cfg"]}}
    return prompt


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_substitutes_the_templates_loaders(host, run_workflow, kind):
    prompt = _template_prompt(kind)
    result = run_workflow(prompt, tiny_model=kind)
    assert {"1", "2", "3", "10", "12"} <= set(result.ran)
    cli.substitute_tiny_models(host.nodes, prompt, kind)
    assert [prompt[n]["class_type"] for n in "123"] == [cli.TINY_NODES[r] for r in ("model", "clip", "vae")]
    assert prompt["2"]["inputs"] == {"kind": kind, "seed": 0}


def test_tiny_model_refuses_a_graph_of_another_family(host):
    prompt = _template_prompt("flux")
    with pytest.raises(conv.WorkflowError, match=r"node 2 \(DualCLIPLoader\).*type 'flux'.*--tiny-model flux"):
        cli.substitute_tiny_models(host.nodes, prompt, "sdxl")
    assert prompt["2"]["class_type"] == "DualCLIPLoader", "nothing half-substituted"
    with pytest.raises(conv.WorkflowError, match="no loader node"):
        cli.substitute_tiny_models(host.nodes, {"1": {"class_type": "EmptySD3LatentImage", "inputs": {}}}, "flux")


def test_cli_runs_a_dit_graph_on_its_tiny_model(host, tmp_path):
    import json
    path = tmp_path / "flux_api.json"
    path.write_text(json.dumps(_template_prompt("flux")))
    api = tmp_path / "ran.json"
    rc = cli.main(["run", str(path), "--tiny-model", "flux", "--output", str(tmp_path), "--quiet",
                   "--save-api", str(api)])
    assert rc == 0
    ran = json.loads(api.read_text())
    assert ran["2"]["class_type"] == cli.TINY_NODES["clip"] and ran["2"]["inputs"] == {"kind": "flux", "seed": 0}
