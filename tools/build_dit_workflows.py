"""Write the DiT story workflows (workflows/storykit_csa_<family>.json, storykit_1p1s_flux.json) from the host's
own node definitions.

    bash tools/storykit.sh python tools/build_dit_workflows.py [FAMILY ...] [1p1s_flux]

Each graph uses the loader nodes, model file names, sampler settings and latent node of ComfyUI's own text-to-image
template for that family, so a user's model files drop in; StoryKit's Story Prompt, Consistent Self-Attention and
Story Sampler sit where the template has its text encoder and sampler, and the frames end in a comic page.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# family: (loaders, model sampling node or None, guidance (FluxGuidance) or None, cfg, steps, sampler, scheduler,
#          latent node, size, and the template's scheduler node, when it has one, for the Story Sampler's sigmas)
FAMILIES = {
    "flux": {"clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                         "type": "flux"}),
             "unet": "flux1-dev.safetensors", "vae": "ae.safetensors", "sampling": None, "guidance": 3.5,
             "cfg": 1.0, "steps": 20, "sampler": "euler", "scheduler": "simple", "latent": "EmptySD3LatentImage",
             "size": 1024, "negative": ""},
    "flux2": {"clip": ("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2"}),
              "unet": "flux2_dev_fp8mixed.safetensors", "vae": "full_encoder_small_decoder.safetensors",
              "sampling": None, "guidance": 4.0, "cfg": 1.0, "steps": 20, "sampler": "euler", "scheduler": "simple",
              "latent": "EmptyFlux2LatentImage", "size": 1024, "negative": "", "sigmas": "Flux2Scheduler"},
    "qwen_image": {"clip": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                           "type": "qwen_image"}),
                   "unet": "qwen_image_fp8_e4m3fn.safetensors", "vae": "qwen_image_vae.safetensors",
                   "sampling": ("ModelSamplingAuraFlow", {"shift": 3.1}), "guidance": None, "cfg": 4.0, "steps": 20,
                   "sampler": "euler", "scheduler": "simple", "latent": "EmptySD3LatentImage", "size": 1328,
                   "negative": "blurry, low quality, deformed"},
    "z_image": {"clip": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}),
                "unet": "z_image_turbo_bf16.safetensors", "vae": "ae.safetensors",
                "sampling": ("ModelSamplingAuraFlow", {"shift": 3.0}), "guidance": None, "cfg": 1.0, "steps": 8,
                "sampler": "res_multistep", "scheduler": "simple", "latent": "EmptySD3LatentImage", "size": 1024,
                "negative": ""},
}


def _loaders(g, spec):
    """The template's UNETLoader, text-encoder loader and VAELoader, left column."""
    unet = g.add("UNETLoader", {"unet_name": spec["unet"], "weight_dtype": "default"}, pos=(40, 80))
    clip_type, clip_widgets = spec["clip"]
    clip = g.add(clip_type, {**clip_widgets, "device": "default"}, pos=(40, 240))
    vae = g.add("VAELoader", {"vae_name": spec["vae"]}, pos=(40, 440))
    return unet, clip, vae


def _decode_and_save(g, sampler, vae, prefix, decode_pos, save_pos, side):
    decode = g.add("VAEDecode", pos=decode_pos)
    g.connect(sampler, "LATENT", decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    save = g.add("SaveImage", {"filename_prefix": prefix}, pos=save_pos, size=(side, side))
    g.connect(decode, "IMAGE", save, "images")
    return decode


def build(nodes_module, family: str) -> str:
    from storykit.runner.workflow_builder import Graph
    spec = FAMILIES[family]
    g = Graph(nodes_module.NODE_CLASS_MAPPINGS)
    unet, clip, vae = _loaders(g, spec)
    model = unet
    if spec["sampling"]:
        kind, widgets = spec["sampling"]
        model = g.add(kind, widgets, pos=(380, 80))
        g.connect(unet, "MODEL", model, "model")
    csa = g.add("StoryKitConsistentSelfAttention", {"sampling_rate": 0.5}, pos=(700, 80))
    g.connect(model, "MODEL", csa, "model")
    from storykit.nodes.nodes_consistent_attention import EXAMPLE_STORY  # the node's own example story
    prompt = g.add("StoryKitStoryPrompt", {"story": EXAMPLE_STORY, "style": "Storybook watercolour",
                                           "negative": spec["negative"], "references_per_character": 2},
                   pos=(40, 560), size=(560, 520))
    g.connect(clip, "CLIP", prompt, "clip")
    positive = prompt
    if spec["guidance"] is not None:
        positive = g.add("FluxGuidance", {"guidance": spec["guidance"]}, pos=(700, 560))
        g.connect(prompt, 0, positive, "conditioning")
    latent = g.add(spec["latent"], {"width": spec["size"], "height": spec["size"], "batch_size": 1},
                   pos=(700, 720))
    sampler = g.add("StoryKitStorySampler", {"steps": spec["steps"], "cfg": spec["cfg"],
                                             "sampler_name": spec["sampler"], "scheduler": spec["scheduler"],
                                             "batch_size": 2}, pos=(1120, 80))
    g.connect(csa, "MODEL", sampler, "model")
    g.connect(positive, 0, sampler, "positive")
    g.connect(prompt, 1, sampler, "negative")
    g.connect(prompt, 2, sampler, "story")
    g.connect(latent, "LATENT", sampler, "latent_image")
    if spec.get("sigmas"):  # FLUX.2's template: a schedule that depends on the picture size
        sigmas = g.add(spec["sigmas"], {"steps": spec["steps"], "width": spec["size"], "height": spec["size"]},
                       pos=(700, 880))
        g.connect(sigmas, "SIGMAS", sampler, "sigmas")
    decode = _decode_and_save(g, sampler, vae, f"storykit_csa_{family}", (1520, 80), (1900, 80), 420)
    captions = g.add("PreviewAny", title="Captions", pos=(1120, 600))
    g.connect(prompt, 3, captions, "source")
    page = g.add("StoryKitComicLayout", pos=(1520, 220))
    g.connect(decode, "IMAGE", page, "frames")
    g.connect(prompt, 3, page, "captions")
    save_page = g.add("SaveImage", {"filename_prefix": f"storykit_csa_{family}_page"}, title="Save comic page",
                      pos=(2360, 80), size=(520, 520))
    g.connect(page, "IMAGE", save_page, "images")
    return g.dumps()


ONE_PROMPT_IDENTITY = "a watercolor illustration of a small red fox wearing a green knitted scarf"
ONE_PROMPT_FRAMES = ("reading a book under an oak tree\nrunning through a snowy forest\n"
                     "sailing a paper boat on a pond\nsleeping by a campfire at night")


def build_1p1s(nodes_module, family: str = "flux") -> str:
    """One-Prompt-One-Story on FLUX.1 dev: the template's loaders and KSampler (cfg 1, euler/simple, negative =
    ConditioningZeroOut) with FluxGuidance 3.5, the story encoder, IPCA (exact path: T5 is bidirectional) and one
    shared initial noise for every frame."""
    from storykit.runner.workflow_builder import Graph
    spec = FAMILIES[family]
    g = Graph(nodes_module.NODE_CLASS_MAPPINGS)
    unet, clip, vae = _loaders(g, spec)
    encode = g.add("StoryKitOnePromptStoryEncode", {"identity_prompt": ONE_PROMPT_IDENTITY,
                                                    "frame_prompts": ONE_PROMPT_FRAMES}, pos=(420, 240),
                   size=(460, 420))
    g.connect(clip, "CLIP", encode, "clip")
    ipca = g.add("StoryKitIdentityPreservingCrossAttention", {"path": "concatenated (exact)"}, pos=(420, 80))
    g.connect(unet, "MODEL", ipca, "model")
    g.connect(encode, 1, ipca, "identity")
    guidance = g.add("FluxGuidance", {"guidance": spec["guidance"]}, pos=(940, 240))
    g.connect(encode, 0, guidance, "conditioning")
    negative = g.add("ConditioningZeroOut", pos=(940, 380))
    g.connect(encode, 0, negative, "conditioning")
    latent = g.add(spec["latent"], {"width": spec["size"], "height": spec["size"]}, pos=(940, 480))
    g.connect(encode, 2, latent, "batch_size")
    shared = g.add("StoryKitSharedNoiseLatent", pos=(940, 660))
    g.connect(latent, "LATENT", shared, "samples")
    sampler = g.add("KSampler", {"seed": 42, "steps": spec["steps"],
                                 "cfg": spec["cfg"], "sampler_name": spec["sampler"],
                                 "scheduler": spec["scheduler"], "denoise": 1.0}, pos=(1300, 80))
    g.connect(ipca, "MODEL", sampler, "model")
    g.connect(guidance, 0, sampler, "positive")
    g.connect(negative, 0, sampler, "negative")
    g.connect(shared, "LATENT", sampler, "latent_image")
    _decode_and_save(g, sampler, vae, f"storykit_1p1s_{family}", (1660, 80), (1960, 80), 480)
    prompts = g.add("PreviewAny", title="Consolidated prompts", pos=(1300, 520))
    g.connect(encode, 3, prompts, "source")
    return g.dumps()


def main() -> int:
    sys.path.insert(0, str(REPO.parent))
    from storykit.runner import host
    h = host.boot(cpu=True)
    for name in sys.argv[1:] or [*FAMILIES, "1p1s_flux"]:
        if name == "1p1s_flux":
            text, target = build_1p1s(h.nodes, "flux"), "storykit_1p1s_flux.json"
        else:
            text, target = build(h.nodes, name), f"storykit_csa_{name}.json"
        (REPO / "workflows" / target).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
