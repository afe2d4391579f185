"""StoryDiffusion's image stage as nodes: Story Prompt, Consistent Self-Attention and Story Sampler."""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from .v3 import io

from ..kernels import story_plan
from . import csa_patch, routing, story_tokens

log = logging.getLogger("storykit")

Story = io.Custom("STORYKIT_STORY")

MAX_TOKEN_CHUNKS = 3  # 3 x 75 tokens per frame prompt; every frame of the batch is padded to a common length
STYLES = {
    "(none)": ("{prompt}", ""),
    "Comic book": ("comic book panel, {prompt}, bold ink lines, flat colours, graphic novel style",
                   "photograph, realistic, blurry"),
    "Japanese anime": ("anime artwork, {prompt}, anime style, key visual, vibrant, studio anime",
                       "photo, realistic, 3d render"),
    "Storybook watercolour": ("children's storybook illustration, {prompt}, soft watercolour, gentle colours",
                              "photo, harsh lighting, 3d render"),
    "Digital painting": ("digital painting, {prompt}, detailed, painterly, concept art",
                         "photo, low detail, blurry"),
    "Photographic": ("cinematic photo, {prompt}, 35mm photograph, film grain, highly detailed",
                     "drawing, painting, illustration, cartoon, anime"),
    "Line art": ("line art drawing, {prompt}, clean lines, monochrome, professional line art",
                 "colour, photo, painting, realistic, shading"),
    "Film noir": ("black and white film noir still, {prompt}, high contrast, dramatic shadows",
                  "colour, bright, cheerful"),
}
EXAMPLE_STORY = """[Mia] a young woman with short red hair, round glasses, green raincoat
[Otto] an old man with a white beard, brown tweed jacket, flat cap
[Mia] wakes up in a small attic room, morning light # Monday.
[Mia] runs to catch a tram in the rain # Late again.
[Otto] feeds pigeons in a park # Otto waits.
[Mia] and [Otto] share an umbrella at the tram stop # They meet.
[NC] an empty street at night, wet cobblestones, lamplight # The end."""


# ---------------------------------------------------------------------------------------------- story prompt
def _pad_to(cond: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a [1, T, D] conditioning to `length` tokens (a multiple of T): cross-attention over repeated keys and
    values is exactly the attention over the originals, so padding never changes a frame's picture."""
    return cond.repeat(1, length // cond.shape[1], 1)


def _tokenize_alike(clip, prompts: list[str]) -> list[dict]:
    """Tokenize every frame; encoders that take one unchunked sequence (T5, LLMs: the DiTs' encoders) are padded
    with their own pad token to the longest frame, so all frames of a story batch have one text length (a DiT's
    joint attention over repeated text would not be the frame's own picture, as repeating is for CLIP's chunks)."""
    tokens = [clip.tokenize(prompt) for prompt in prompts]
    longest = {}
    for key in tokens[0]:
        if all(len(t.get(key, ())) == 1 for t in tokens):  # one sequence per prompt: not CLIP's 77-token chunks
            lengths = {len(t[key][0]) for t in tokens}
            if len(lengths) > 1:
                longest[key] = max(lengths)
    if not longest:
        return tokens
    options = {"tokenizer_options": {f"{key}_min_length": length for key, length in longest.items()}}
    return [clip.tokenize(prompt, **options) for prompt in prompts]


def encode_frames(clip, prompts: list[str], where: list[str], lengths: list | None = None) -> list:
    """Per-frame prompts -> one CONDITIONING whose batch is the frames (tokens padded to a common length).
    `lengths`, when given, receives each frame's own number of conditioning rows (before the common padding)."""
    conds, pooled = [], []
    for tokens, place in zip(_tokenize_alike(clip, prompts), where, strict=True):
        chunks = max(len(v) for v in tokens.values())
        if chunks > MAX_TOKEN_CHUNKS:
            raise ValueError(f"StoryKit Story Prompt: {place}: the prompt is longer than {MAX_TOKEN_CHUNKS * 75} "
                             f"tokens ({chunks} blocks of 75) with the character descriptions and the style; "
                             "shorten it (the character description, the frame text or the style)")
        cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
        conds.append(cond)
        pooled.append(pool)
    if lengths is not None:
        lengths.extend(c.shape[1] for c in conds)
    length = math.lcm(*(c.shape[1] for c in conds))
    batch = torch.cat([_pad_to(c, length) for c in conds])
    # None where the encoder has no pooled output (FLUX.2's Mistral), as CLIPTextEncode hands it over: FLUX models
    # read the key
    extra = {"pooled_output": torch.cat(pooled) if all(p is not None for p in pooled) else None}
    return [[batch, extra]]


class StoryPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitStoryPrompt",
            display_name="Story Prompt (StoryDiffusion)",
            category="StoryKit/consistent attention",
            description="A whole story in StoryDiffusion's syntax -> one conditioning per frame (as one batch), the "
                        "story plan (who is in which frame, which frames are references) and the captions.",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder: the checkpoint's (SD1.5, SDXL) or the "
                                              "CLIP loader's (FLUX, Chroma, Qwen-Image, Z-Image, SD3.5)."),
                io.String.Input("story", multiline=True, default=EXAMPLE_STORY, dynamic_prompts=False,
                                tooltip="Character lines first: '[Name] what they look like'. Then one frame per "
                                        "line; [Name] in a frame is replaced by that description, several names "
                                        "make a frame with several characters, [NC] a frame with no character. "
                                        "Text after '#' is the frame's caption; write \\# for a literal '#'."),
                io.Combo.Input("style", options=list(STYLES), default="(none)",
                               tooltip="A style template wrapped around every frame prompt (and its negative "
                                       "words added to the negative prompt)."),
                io.String.Input("custom_style", default="", multiline=False, dynamic_prompts=False,
                                tooltip="Your own template with a {prompt} slot, e.g. 'oil painting of {prompt}, "
                                        "impasto'. Overrides 'style' when not empty."),
                io.String.Input("negative", multiline=True,
                                default="lowres, bad anatomy, bad hands, missing fingers, worst quality, blurry",
                                tooltip="What no frame should show."),
                io.Int.Input("references_per_character", default=2, min=1, max=8,
                             tooltip="How many frames of each character are generated together first and stored "
                                     "as its identity bank (StoryDiffusion's id_length, 2-4). More: steadier "
                                     "identity, more memory."),
                io.Combo.Input("reference_mode", options=["auto", "first"], default="auto",
                               tooltip="auto: each character's first frames where it is alone (then frames it "
                                       "shares) are its references. first: the first frames of the story are the "
                                       "references, as in the StoryDiffusion app."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                Story.Output(display_name="story"),
                io.String.Output(display_name="captions"),
            ],
        )

    @classmethod
    def execute(cls, clip, story, style, custom_style, negative, references_per_character,
                reference_mode) -> io.NodeOutput:
        template, style_negative = (custom_style, "") if custom_style.strip() else STYLES[style]
        plan = story_plan.parse_story(story, template, references_per_character, reference_mode)
        for note in plan.notes:
            log.info("StoryKit Story Prompt: %s", note)
        plan.negative = ", ".join(p for p in (negative.strip(), style_negative) if p)
        lengths: list[int] = []
        positive = encode_frames(clip, [f.prompt for f in plan.frames], [f"line {f.line}" for f in plan.frames],
                                 lengths)
        plan.extras["tokens"] = story_tokens.description_tokens(clip, plan, lengths)
        negative_cond = encode_frames(clip, [plan.negative], ["negative"])
        return io.NodeOutput(positive, negative_cond, plan, "\n".join(plan.captions))


# ---------------------------------------------------------------------------------------------- CSA model patch
BANK_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BANK_LOCATIONS = {"cpu": "cpu", "auto (gpu up to 1 GB)": "auto", "gpu": "device"}


class ConsistentSelfAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitConsistentSelfAttention",
            display_name="Consistent Self-Attention (StoryDiffusion)",
            category="StoryKit/consistent attention",
            description="Training-free consistency: in the chosen self-attention layers each frame of a batch also "
                        "attends to a random sample of the other frames' tokens, so faces, hair and clothes "
                        "converge across the story while each frame keeps its own prompt.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to make story-consistent: an SD1.5/SDXL UNet or "
                                                 "a joint-attention DiT (FLUX.1, FLUX.2, Chroma, Qwen-Image, "
                                                 "Z-Image, SD3.5). LoRAs applied before or after both work."),
                io.Float.Input("sampling_rate", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of each other frame's tokens a frame looks at. Higher: more alike "
                                       "characters, less varied poses. Paper default 0.5; 0.3 is too weak."),
                io.String.Input("rate_per_level", default="",
                                tooltip="Optional rates per resolution level, finest first, e.g. '0.5, 0.5, 0.7' "
                                        "(SDXL's up blocks are levels 1 and 2: the reference's sa64 and sa32). "
                                        "Empty: sampling_rate everywhere; a short list repeats its last value."),
                io.Combo.Input("layers", options=list(csa_patch.LAYER_SETS), default="decoder",
                               tooltip="Which self-attention layers share tokens. decoder (up blocks) is what "
                                       "StoryDiffusion does; adding the middle/encoder binds layout more tightly."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the denoising the sharing starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops (1 = last step). Ending early keeps identity from the "
                                       "coarse steps and lets details differ."),
                io.Float.Input("skip_probability", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Chance that a layer call skips sharing (seeded). The reference skips "
                                       "0.3 early and 0.1 late for more variety; 0 is deterministic full sharing."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the token sampling: which tokens of the other frames are shared."),
                io.Int.Input("window_size", default=0, min=0, max=64,
                             tooltip="Sliding window (paper's Algorithm 1) for batches longer than this: frames "
                                     "share only within overlapping windows, outputs averaged. 0 = off."),
                io.Combo.Input("bank_precision", options=list(BANK_DTYPES), default="fp16",
                               tooltip="Precision of the stored reference tokens; fp16 halves the memory."),
                io.Combo.Input("bank_location", options=list(BANK_LOCATIONS), default="cpu",
                               tooltip="Where reference tokens live between steps. cpu: streamed to the GPU one "
                                       "layer at a time (long stories on small cards)."),
                io.String.Input("blocks", default="",
                                tooltip="Which blocks share tokens, as ranges: 'double 10-18, single 0-37' (FLUX), "
                                        "'double 30-59' (Qwen-Image), 'joint 12-23' (SD3.5, Z-Image), "
                                        "'output 0-11' (UNet). Empty: the model's default, the later half of "
                                        "the blocks (on UNets: the 'layers' choice). Fewer blocks: a smaller "
                                        "bank and looser likeness."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, sampling_rate, rate_per_level, layers, start_percent, end_percent, skip_probability,
                seed, window_size, bank_precision, bank_location, blocks="") -> io.NodeOutput:
        rates = csa_patch.parse_rates(rate_per_level, sampling_rate)
        patched = csa_patch.patch_model(model, rates, layers, start_percent, end_percent, skip_probability, seed,
                                        window_size, BANK_DTYPES[bank_precision], BANK_LOCATIONS[bank_location],
                                        blocks)
        return io.NodeOutput(patched)


# ---------------------------------------------------------------------------------------------- story sampler
def _frame_rows(conditioning: list, rows: list[int], n_frames: int) -> list:
    """The conditioning of some frames: per-frame tensors (batch == frames) are sliced, shared ones kept."""
    out = []
    for cond, extra in conditioning:
        extra = dict(extra)
        if cond.shape[0] == n_frames:
            cond = cond[rows]
        pooled = extra.get("pooled_output")
        if pooled is not None and pooled.shape[0] == n_frames:
            extra["pooled_output"] = pooled[rows]
        out.append([cond, extra])
    return out


def story_batches(plan: story_plan.StoryPlan, batch_size: int) -> list[list[int]]:
    """References first (grouped by character, so each character's references share one batch where they fit),
    then the other frames in story order, `batch_size` at a time."""
    refs = sorted(plan.reference_indices(), key=lambda i: (plan.frames[i].characters, i))
    size = max(batch_size, 1)
    ref_batches = [refs[i:i + max(size, plan.references_per_character)]
                   for i in range(0, len(refs), max(size, plan.references_per_character))]
    readers = plan.reader_indices()
    return ref_batches + [readers[i:i + size] for i in range(0, len(readers), size)]


def with_references(plan: story_plan.StoryPlan, batch: list[int]) -> list[int]:
    """A reader batch preceded by the reference frames of its characters: sampled together, the readers see the
    references' live tokens instead of the bank's (the pictures of the bank, at the cost of the references'
    compute in every batch)."""
    wanted = set().union(*(plan.frames[i].characters for i in batch))
    refs = [r for r in plan.reference_indices() if set(plan.frames[r].characters) & wanted and r not in batch]
    return refs + batch


def bank_budget(gigabytes: float) -> int:
    """The memory the bank may take: the given size, or by default half of the RAM free now."""
    if gigabytes > 0:
        return int(gigabytes * 1e9)
    import psutil
    return int(psutil.virtual_memory().available * BANK_SHARE_OF_FREE_RAM)


BANK_SHARE_OF_FREE_RAM = 0.5
PIXELS_PER_LATENT = 8  # masks and the routing picture are given and shown at latent size x 8
PHOTO_SEED = 1_000_003  # photo k's fixed noise: seed + PHOTO_SEED * (k + 1)


class StorySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers
        return io.Schema(
            node_id="StoryKitStorySampler",
            display_name="Story Sampler (StoryDiffusion)",
            category="StoryKit/consistent attention",
            description="Samples a whole story like the StoryDiffusion app: each character's reference frames "
                        "together first (their shared tokens go to the bank), then every other frame in small "
                        "batches that read the bank, so memory does not grow with the story's length.",
            inputs=[
                io.Model.Input("model", tooltip="A model through StoryKit Consistent Self-Attention."),
                io.Conditioning.Input("positive", tooltip="Per-frame conditioning from StoryKit Story Prompt."),
                io.Conditioning.Input("negative", tooltip="What no frame should show (the Story Prompt's negative)."),
                Story.Input("story", tooltip="The story plan from StoryKit Story Prompt."),
                io.Latent.Input("latent_image", tooltip="Size of the frames (an Empty Latent Image of batch 1), "
                                                        "or one latent per frame for img2img."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Combo.Input("seed_mode", options=["same for all frames", "per frame (seed + frame number)"],
                               default="same for all frames",
                               tooltip="StoryDiffusion uses one seed for all frames: similar composition, "
                                       "strongest likeness. Per frame: more varied framing."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Paper default 50; consistency is weaker with few steps."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; the paper uses 5.0."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                               tooltip="The paper uses DDIM; any host sampler works (the bank is keyed by sigma)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="How the noise levels are spaced; references and readers use the same."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Frames sampled together after the references. Memory depends on this and "
                                     "on the number of references, not on the story's length."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 draws every frame from noise; lower keeps more of latent_image."),
                io.Float.Input("bank_memory_gb", default=0.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="How much memory the reference bank may take (0 = half of the free RAM). "
                                       "A story whose bank would not fit re-runs its reference frames beside "
                                       "every reader batch instead: the same pictures, more compute."),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="Optional SAMPLER (KSamplerSelect, or any sampler node), as "
                                         "SamplerCustomAdvanced graphs use; replaces sampler_name."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional SIGMAS (BasicScheduler, Flux2Scheduler, ...), as ComfyUI's own "
                                        "DiT templates build them; replaces steps, scheduler and denoise."),
            ],
            outputs=[io.Latent.Output(),
                     io.Image.Output(display_name="routing",
                                     tooltip="Who is where in each frame, as the sharing used it: one colour per "
                                             "character, black background, grey not shared. Blend it over the "
                                             "decoded frames (StoryKit Routing Overlay) to see why a face "
                                             "leaked.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, story, latent_image, seed, seed_mode, steps, cfg, sampler_name,
                scheduler, batch_size, denoise, bank_memory_gb=0.0, sampler=None, sigmas=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        plan: story_plan.StoryPlan = story
        n_frames = len(plan.frames)
        for cond, _ in positive:
            if cond.shape[0] not in (1, n_frames):
                raise ValueError(f"StoryKit Story Sampler: positive has {cond.shape[0]} prompts but the story has "
                                 f"{n_frames} frames; connect the positive output of the same Story Prompt")
        state = csa_patch.state_of(model)
        if state is None:
            log.warning("StoryKit Story Sampler: the model has no Consistent Self-Attention; frames are sampled "
                        "independently")
        samples = latent_image["samples"]
        if samples.shape[0] not in (1, n_frames):
            raise ValueError(f"StoryKit Story Sampler: latent_image has {samples.shape[0]} latents; give 1 (the "
                             f"frame size) or one per frame ({n_frames})")
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        per_frame = samples if samples.shape[0] == n_frames else samples.expand(n_frames, *samples.shape[1:])
        seeds = [seed if seed_mode.startswith("same") else (seed + i) % 2 ** 64 for i in range(n_frames)]
        prepared = routing.prepare(plan, per_frame.shape, PIXELS_PER_LATENT)
        photos = routing.photo_latents(prepared, per_frame.shape, PIXELS_PER_LATENT)
        if photos and state is None:
            raise ValueError("StoryKit Story Sampler: the story has a character photo but the model has no "
                             "Consistent Self-Attention; connect the model through it")
        latents = torch.cat([per_frame, *(photos[i].to(per_frame) for i in sorted(photos))])
        seeds += [(seed + PHOTO_SEED * (n + 1)) % 2 ** 64 for n in range(len(photos))]
        noise = torch.cat([comfy.sample.prepare_noise(latents[i:i + 1], seeds[i]) for i in range(len(latents))])
        full = prepared.plan_of(plan)

        if sigmas is not None:
            if sigmas.numel() < 2:
                raise ValueError("StoryKit Story Sampler: sigmas holds fewer than 2 values: connect a scheduler "
                                 "with at least 1 step")
            steps = sigmas.numel() - 1
        batches = [(rows, rows) for rows in story_batches(full, batch_size)]
        if state is not None and cls._bank_too_big(state, full, per_frame.shape, steps, cfg, bank_memory_gb):
            state.bank_enabled = False
            refs = set(full.reference_indices())
            batches = [(rows, rows) if rows[0] in refs else (with_references(full, rows), rows)
                       for rows, _ in batches]
        batches = [(rows, [i for i in keep if i < n_frames]) for rows, keep in batches]
        total = sum(len(rows) for rows, _ in batches) * steps
        result = torch.empty_like(per_frame)
        progress = comfy.utils.ProgressBar(total)
        done = 0
        try:
            with state.story_run() if state else contextlib.nullcontext():
                if state is not None:
                    state.routing = prepared.routing
                for rows, keep in batches:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    if state is not None:
                        state.plan = [csa_patch.StoryFrame(i, frozenset(full.frames[i].characters),
                                                           full.frames[i].reference) for i in rows]
                        process_in = model.model.process_latent_in
                        state.photo_inputs = {r: (process_in(photos[i]), noise[i:i + 1])
                                              for r, i in enumerate(rows) if i in photos}

                    def on_step(step, x0, x, total_steps, done=done, size=len(rows)):
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        progress.update_absolute(done + (step + 1) * size, total)

                    conds = _frame_rows(positive, [prepared.cond_row[i] for i in rows], n_frames)
                    if sigmas is None and sampler is None:
                        out = comfy.sample.sample(model, noise[rows], steps, cfg, sampler_name, scheduler, conds,
                                                  negative, latents[rows], denoise=denoise, callback=on_step,
                                                  disable_pbar=True, seed=seeds[rows[0]])
                    else:  # the SamplerCustomAdvanced pieces: a SAMPLER object and/or a SIGMAS schedule
                        out = comfy.sample.sample_custom(
                            model, noise[rows], cfg, sampler or comfy.samplers.sampler_object(sampler_name),
                            sigmas if sigmas is not None else cls._sigmas(model, scheduler, steps, denoise),
                            conds, negative, latents[rows], callback=on_step, disable_pbar=True,
                            seed=seeds[rows[0]])
                    if keep:
                        result[keep] = out[[rows.index(i) for i in keep]].to(result.dtype)
                    done += len(rows) * steps
                    progress.update_absolute(done, total)
                pictures = routing.routing_pictures(prepared.routing, list(plan.characters), plan.frames,
                                                    per_frame.shape, PIXELS_PER_LATENT)
        finally:
            if state is not None:
                state.bank_enabled = True
                state.photo_inputs = {}
        output = {key: value for key, value in latent_image.items() if key not in ("noise_mask", "batch_index")}
        output["samples"] = result
        return io.NodeOutput(output, pictures)

    @staticmethod
    def _sigmas(model, scheduler: str, steps: int, denoise: float):
        import comfy.samplers
        sampling = model.get_model_object("model_sampling")
        total = steps if denoise >= 1.0 else int(steps / max(denoise, 1e-4))
        return comfy.samplers.calculate_sigmas(sampling, scheduler, total)[-(steps + 1):].cpu()

    @staticmethod
    def _bank_too_big(state, plan, latent_shape, steps: int, cfg: float, bank_memory_gb: float) -> bool:
        """Print what the bank will take; True when it would not fit its budget (then the references re-run)."""
        element = torch.finfo(state.bank.dtype).bits // 8 if state.bank.dtype is not None else 4
        halves = 1 if cfg == 1.0 else 2  # at cfg 1 the host runs no uncond half
        per_step = state.site.bank_bytes(latent_shape, max(state.rates), element) * halves
        refs = len(plan.reference_indices())
        need, budget = per_step * refs * steps, bank_budget(bank_memory_gb)
        log.info("StoryKit Story Sampler: the bank takes %.1f MB per reference per step, %.2f GB for %d "
                 "references x %d steps (budget %.2f GB)", per_step / 1e6, need / 1e9, refs, steps, budget / 1e9)
        if need > budget and plan.reader_indices():
            log.warning("StoryKit Story Sampler: a bank of %.2f GB would not fit in %.2f GB: the reference frames "
                        "are re-run beside every reader batch instead (same pictures, more compute); keep fewer "
                        "blocks, a shorter step range or a lower rate to use a bank", need / 1e9, budget / 1e9)
            return True
        return False


NODES = [StoryPrompt, ConsistentSelfAttention, StorySampler]
