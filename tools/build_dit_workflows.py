"""Write the DiT story workflows (workflows/storykit_csa_<family>.json, storykit_1p1s_flux.json) and the identity
routing workflows (storykit_two_characters[_flux].json, storykit_photo_reference[_flux].json: an SDXL checkpoint
and FLUX.1 dev) from the host's own node definitions.

    bash tools/storykit.sh python tools/build_dit_workflows.py [FAMILY ...] [1p1s_flux] [routing]

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


def _story_sampler(g, spec, csa, prompt, story, batch_size: int):
    """The Story Sampler with the family's settings: the CSA model, the Story Prompt's conditioning (through
    FluxGuidance where the family has it), a story plan, the latent node of the family's template."""
    positive = prompt
    if spec["guidance"] is not None:
        positive = g.add("FluxGuidance", {"guidance": spec["guidance"]}, pos=(700, 560))
        g.connect(prompt, 0, positive, "conditioning")
    latent = g.add(spec["latent"], {"width": spec["size"], "height": spec["size"], "batch_size": 1},
                   pos=(700, 720))
    sampler = g.add("StoryKitStorySampler", {"steps": spec["steps"], "cfg": spec["cfg"],
                                             "sampler_name": spec["sampler"], "scheduler": spec["scheduler"],
                                             "batch_size": batch_size}, pos=(1120, 80))
    g.connect(csa, "MODEL", sampler, "model")
    g.connect(positive, 0, sampler, "positive")
    g.connect(prompt, 1, sampler, "negative")
    g.connect(story, 0 if story is not prompt else 2, sampler, "story")
    g.connect(latent, "LATENT", sampler, "latent_image")
    if spec.get("sigmas"):  # FLUX.2's template: a schedule that depends on the picture size
        sigmas = g.add(spec["sigmas"], {"steps": spec["steps"], "width": spec["size"], "height": spec["size"]},
                       pos=(700, 880))
        g.connect(sigmas, "SIGMAS", sampler, "sigmas")
    return sampler


def _captions_and_page(g, prompt, decode, name: str) -> None:
    """Captions shown as text, and the frames laid out as a comic page with them, saved."""
    captions = g.add("PreviewAny", title="Captions", pos=(1120, 600))
    g.connect(prompt, 3, captions, "source")
    page = g.add("StoryKitComicLayout", pos=(1520, 220))
    g.connect(decode, "IMAGE", page, "frames")
    g.connect(prompt, 3, page, "captions")
    save_page = g.add("SaveImage", {"filename_prefix": f"{name}_page"}, title="Save comic page",
                      pos=(2360, 80), size=(520, 520))
    g.connect(page, "IMAGE", save_page, "images")


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
    sampler = _story_sampler(g, spec, csa, prompt, prompt, 2)
    decode = _decode_and_save(g, sampler, vae, f"storykit_csa_{family}", (1520, 80), (1900, 80), 420)
    _captions_and_page(g, prompt, decode, f"storykit_csa_{family}")
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


TWO_CHARACTERS = """[Lena] a young woman with long black hair, yellow raincoat, red boots
[Tom] an old man with a white beard, brown tweed jacket, flat cap
[Lena] walks through a rainy market street # Lena looks for the old bookshop.
[Lena] reads a map under her umbrella # Lost again.
[Tom] dusts the shelves of his small bookshop # Tom opens the shop.
[Tom] pours a cup of tea by the window # A quiet morning.
[Lena@left] and [Tom@right] shake hands at the shop counter # They meet.
[Lena@left] and [Tom@right] read an old book together # The map was in the book."""
PHOTO_STORY = """[Max] a man with short grey hair, dark suit, white shirt, blue tie
[Max] reads a newspaper in a sunny cafe # Morning.
[Max] walks a dog along the river # A walk.
[Max] plays chess in a park # His move.
[Max] waves from a train window # See you soon."""
EXAMPLE_PHOTO = "storykit_example_photo.jpg"  # data/photos/ (see its NOTICE.md); LoadImage reads ComfyUI's input
PHOTO_NOTE = (f"Load your own photo here (click 'choose file to upload'): one person, face visible. The example "
              f"{EXAMPLE_PHOTO} ships in StoryKit's data/photos/ folder (licence in NOTICE.md there); copy it into "
              "ComfyUI's input folder to use it.\n\nThe photo becomes [Max]'s reference: every frame of [Max] reads "
              "it (use: photo only). Change 'character' on Character Photo to match your story's name.\n\nOptional: "
              "paint over the person in the mask editor (right-click the image, Open in MaskEditor) and connect "
              "LoadImage's MASK to Character Photo's mask; without one, the mask comes from the model's attention.")
ROUTING_SDXL = {"ckpt": "sd_xl_base_1.0.safetensors", "guidance": None, "cfg": 5.0, "steps": 50, "sampler": "ddim",
                "scheduler": "normal", "latent": "EmptyLatentImage", "size": 1024, "batch_size": 4,
                "negative": "lowres, bad anatomy, bad hands, missing fingers, worst quality, blurry"}


def _note(g, text, pos, size=(420, 220)):
    note = g.add("Note", pos=pos, size=size)
    note.data["widgets_values"] = [text]
    note.data.update({"color": "#432", "bgcolor": "#653"})
    return note


def build_routing(nodes_module, family: str, photo: bool) -> str:
    """Several characters (or a photo as a character) on an SDXL checkpoint ("sdxl") or FLUX.1 dev ("flux", the
    template's loaders): Story Prompt -> [Character Photo] -> Identity Routing -> Story Sampler (its routing
    output blended over the frames by Routing Overlay) -> frames, a comic page."""
    from storykit.runner.workflow_builder import Graph
    g = Graph(nodes_module.NODE_CLASS_MAPPINGS)
    if family == "sdxl":
        spec = ROUTING_SDXL
        ckpt = g.add("CheckpointLoaderSimple", {"ckpt_name": spec["ckpt"]}, pos=(40, 80), size=(320, 120))
        model, clip, vae = (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE")
    else:
        spec = {**FAMILIES[family], "batch_size": 2}
        unet, clip_loader, vae_loader = _loaders(g, spec)
        model, clip, vae = (unet, "MODEL"), (clip_loader, "CLIP"), (vae_loader, "VAE")
    csa = g.add("StoryKitConsistentSelfAttention", {"sampling_rate": 0.5}, pos=(700, 80))
    g.connect(*model, csa, "model")
    prompt = g.add("StoryKitStoryPrompt", {"story": PHOTO_STORY if photo else TWO_CHARACTERS,
                                           "style": "Storybook watercolour", "negative": spec["negative"],
                                           "references_per_character": 2}, pos=(40, 560), size=(560, 520))
    g.connect(*clip, prompt, "clip")
    story = prompt
    if photo:
        _note(g, PHOTO_NOTE, pos=(-480, 80), size=(460, 300))
        load = g.add("LoadImage", {"image": EXAMPLE_PHOTO}, pos=(-480, 420), size=(460, 520))
        character = g.add("StoryKitCharacterPhoto", {"character": "Max", "use": "photo only"}, pos=(700, 1120))
        g.connect(prompt, 2, character, "story")
        g.connect(*vae, character, "vae")
        g.connect(load, "IMAGE", character, "image")
        story = character
    routing = g.add("StoryKitIdentityRouting", pos=(700, 900), size=(340, 200))
    g.connect(story, 0 if photo else 2, routing, "story")
    sampler = _story_sampler(g, spec, csa, prompt, routing, spec["batch_size"])
    name = ("storykit_photo_reference" if photo else "storykit_two_characters") + ("" if family == "sdxl" else
                                                                                 f"_{family}")
    decode = _decode_and_save(g, sampler, vae[0], name, (1520, 80), (1900, 80), 420)
    overlay = g.add("StoryKitRoutingOverlay", pos=(1520, 700))
    g.connect(decode, "IMAGE", overlay, "images")
    g.connect(sampler, 1, overlay, "routing")
    shown = g.add("PreviewImage", title="Routing overlay", pos=(1900, 560), size=(420, 420))
    g.connect(overlay, "IMAGE", shown, "images")
    _captions_and_page(g, prompt, decode, name)
    return g.dumps()


ROUTING_WORKFLOWS = {f"storykit_{kind}{'' if family == 'sdxl' else '_' + family}.json": (family, kind == "photo_reference")
                     for family in ("sdxl", "flux") for kind in ("two_characters", "photo_reference")}


def main() -> int:
    sys.path.insert(0, str(REPO.parent))
    from storykit.runner import host
    h = host.boot(cpu=True)
    for name in sys.argv[1:] or [*FAMILIES, "1p1s_flux", "routing"]:
        if name == "routing":
            for target, (family, photo) in ROUTING_WORKFLOWS.items():
                (REPO / "workflows" / target).write_text(build_routing(h.nodes, family, photo), encoding="utf-8")
            continue
        if name == "1p1s_flux":
            text, target = build_1p1s(h.nodes, "flux"), "storykit_1p1s_flux.json"
        else:
            text, target = build(h.nodes, name), f"storykit_csa_{name}.json"
        (REPO / "workflows" / target).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
