"""Write the DiT story workflows (workflows/storykit_csa_<family>.json) from the host's own node definitions.

    bash tools/storykit.sh python tools/build_dit_workflows.py

Each graph uses the loader nodes, model file names, sampler settings and latent node of ComfyUI's own text-to-image
template for that family, so a user's model files drop in; StoryKit's Story Prompt, Consistent Self-Attention and
Story Sampler sit where the template has its text encoder and sampler, and the frames end in a comic page.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORY = """[Mia] a young woman with short red hair, round glasses, green raincoat
[Otto] an old man with a white beard, brown tweed jacket, flat cap
[Mia] wakes up in a small attic room, morning light # Monday.
[Mia] runs to catch a tram in the rain # Late again.
[Otto] feeds pigeons in a park # Otto waits.
[Mia] and [Otto] share an umbrella at the tram stop # They meet.
[NC] an empty street at night, wet cobblestones, lamplight # The end."""

# family: (loaders, model sampling node or None, guidance (FluxGuidance) or None, cfg, steps, sampler, scheduler,
#          latent node, size)
FAMILIES = {
    "flux": {"clip": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                         "type": "flux"}),
             "unet": "flux1-dev.safetensors", "vae": "ae.safetensors", "sampling": None, "guidance": 3.5,
             "cfg": 1.0, "steps": 20, "sampler": "euler", "scheduler": "simple", "latent": "EmptySD3LatentImage",
             "size": 1024, "negative": ""},
    "flux2": {"clip": ("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2"}),
              "unet": "flux2_dev_fp8mixed.safetensors", "vae": "full_encoder_small_decoder.safetensors",
              "sampling": None, "guidance": 4.0, "cfg": 1.0, "steps": 20, "sampler": "euler", "scheduler": "simple",
              "latent": "EmptyFlux2LatentImage", "size": 1024, "negative": ""},
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


def build(nodes_module, family: str) -> str:
    from storykit.runner.workflow_builder import Graph
    spec = FAMILIES[family]
    g = Graph(nodes_module.NODE_CLASS_MAPPINGS)
    unet = g.add("UNETLoader", {"unet_name": spec["unet"], "weight_dtype": "default"}, pos=(40, 80))
    clip_type, clip_widgets = spec["clip"]
    clip = g.add(clip_type, {**clip_widgets, "device": "default"}, pos=(40, 240))
    vae = g.add("VAELoader", {"vae_name": spec["vae"]}, pos=(40, 440))
    model = unet
    if spec["sampling"]:
        kind, widgets = spec["sampling"]
        model = g.add(kind, widgets, pos=(380, 80))
        g.connect(unet, "MODEL", model, "model")
    csa = g.add("StoryKitConsistentSelfAttention", {"sampling_rate": 0.5}, pos=(700, 80))
    g.connect(model, "MODEL", csa, "model")
    prompt = g.add("StoryKitStoryPrompt", {"story": STORY, "style": "Storybook watercolour",
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
    decode = g.add("VAEDecode", pos=(1520, 80))
    g.connect(sampler, "LATENT", decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    save = g.add("SaveImage", {"filename_prefix": f"storykit_csa_{family}"}, pos=(1900, 80), size=(420, 420))
    g.connect(decode, "IMAGE", save, "images")
    captions = g.add("PreviewAny", title="Captions", pos=(1120, 600))
    g.connect(prompt, 3, captions, "source")
    page = g.add("StoryKitComicLayout", pos=(1520, 220))
    g.connect(decode, "IMAGE", page, "frames")
    g.connect(prompt, 3, page, "captions")
    save_page = g.add("SaveImage", {"filename_prefix": f"storykit_csa_{family}_page"}, title="Save comic page",
                      pos=(2360, 80), size=(520, 520))
    g.connect(page, "IMAGE", save_page, "images")
    return g.dumps()


def main() -> int:
    sys.path.insert(0, str(REPO.parent))
    from storykit.runner import host
    h = host.boot(cpu=True)
    for family in sys.argv[1:] or FAMILIES:
        (REPO / "workflows" / f"storykit_csa_{family}.json").write_text(build(h.nodes, family), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
