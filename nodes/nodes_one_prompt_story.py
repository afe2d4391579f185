"""One-Prompt-One-Story nodes: the story encoder (consolidation + SVR), IPCA on the host's MODEL, shared noise."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension
import comfy.sample
import torch
from comfy.ldm.modules import attention as host_attention
from .v3 import io

from ..kernels import one_prompt_story as ops

log = logging.getLogger("storykit")

IDENTITY_TYPE = "STORYKIT_STORY_IDENTITY"
MODES = ["SVR", "NPR", "none"]
IPCA_PATHS = ["bias (fast)", "concatenated (exact)"]
PATCH_KEY = "storykit_ipca"
ENCODER = "StoryKit One-Prompt Story Encode"


@dataclass(frozen=True)
class StoryIdentity:
    """What IPCA needs from the encoder: how many leading columns are the identity (start token + P0), the
    context length they repeat with, and P0 encoded alone (for the concatenated path)."""
    identity_count: int
    context_length: int
    identity_context: torch.Tensor      # [1, identity_count, D]
    frames: int


# ------------------------------------------------------------------------------------------------ tokens
def content_tokens(clip, text: str) -> dict[str, list[tuple]]:
    """The host's tokenization of `text` without start/end/padding, per encoder ("l", and "g" for SDXL).

    Word id 0 marks the tokens the tokenizer adds itself; weights and embedding vectors stay as the host made them."""
    tokens = clip.tokenize(text, return_word_ids=True)
    return {key: [(t[0], t[1]) for batch in batches for t in batch if t[2] != 0] for key, batches in tokens.items()}


def segment_length(segment: dict[str, list], what: str) -> int:
    lengths = {len(v) for v in segment.values()}
    if len(lengths) != 1:
        raise ValueError(f"{ENCODER}: the text encoders tokenize {what} to different lengths {sorted(lengths)}")
    return lengths.pop()


def assemble(clip, segments: list[dict[str, list]], length: int = ops.CONTEXT_LENGTH) -> dict[str, list]:
    """[start] + segments + [end] + padding to `length`, with the host's own special tokens (from tokenizing "")."""
    out = {}
    for key, (template, *_) in clip.tokenize("").items():
        start, end, pad = template[0], template[1], template[-1]
        body = [start] + [t for seg in segments for t in seg[key]] + [end]
        out[key] = [body + [pad] * (length - len(body))]
    return out


def channel_parts(tokens: dict, width: int) -> list[int]:
    """Channel slices of the context per text encoder: SD1.5 one part; SDXL CLIP-L 768 then CLIP-G 1280."""
    keys = set(tokens)
    if len(keys) == 1:
        return [width]
    if keys == {"l", "g"} and width > 768:
        return [768, width - 768]
    raise ValueError(f"{ENCODER}: this CLIP has text encoders {sorted(keys)}; only SD1.5 (l) and SDXL (l, g) "
                     "CLIP models are supported")


def encode(clip, tokens: dict) -> dict:
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    if out["cond"].shape[1] != ops.CONTEXT_LENGTH:
        raise ValueError(f"{ENCODER}: the text encoder returned {out['cond'].shape[1]} positions, expected "
                         f"{ops.CONTEXT_LENGTH}")
    return out


def reweight(embeds: torch.Tensor, sets: ops.TokenSets, mode: str, parts: list[int],
             constants: ops.SVRConstants) -> torch.Tensor:
    if mode == "SVR":
        return ops.reweight_parts(embeds, parts, lambda e: ops.svr(e, sets, constants))
    if mode == "NPR":
        return ops.naive_prompt_reweight(embeds, sets)
    return embeds.clone()


def frame_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class Story:
    """The consolidated prompts of a story: per frame its FramePrompt, assembled tokens, token sets and text."""
    frames: list[str]
    identity: dict[str, list]
    identity_len: int
    plan: list[ops.FramePrompt]
    tokens: list[dict[str, list]]
    sets: list[ops.TokenSets]
    texts: list[str]


def plan_story(clip, identity_prompt: str, frame_prompts: str, window: int) -> Story:
    """Tokenize P0 and each frame once on the host's tokenizer, consolidate, and assemble each frame's prompt."""
    frames = frame_lines(frame_prompts)
    identity_prompt = identity_prompt.strip()
    if not identity_prompt:
        raise ValueError(f"{ENCODER}: identity_prompt is empty; describe the character (and style) once there")
    if not frames:
        raise ValueError(f"{ENCODER}: frame_prompts has no lines; write one line per picture")
    identity = content_tokens(clip, identity_prompt)
    segments = [content_tokens(clip, f) for f in frames]
    n0 = segment_length(identity, "the identity prompt")
    lens = [segment_length(s, f"frame {i + 1}") for i, s in enumerate(segments)]
    try:
        plan = ops.consolidate(n0, lens, window)
    except ops.StoryTooLong as e:
        raise ValueError(f"{ENCODER}: identity_prompt ({n0} tokens) + frame {e.frame + 1} ({lens[e.frame]} tokens) "
                         f"is {e.over} token(s) over CLIP's {ops.CONTENT_BUDGET}; shorten the identity prompt or "
                         "that frame line") from e
    return Story(frames, identity, n0, plan,
                 tokens=[assemble(clip, [identity] + [segments[f] for f in fp.order]) for fp in plan],
                 sets=[ops.token_sets(n0, lens, fp) for fp in plan],
                 texts=[f"frame {fp.express + 1}: " + " ".join([identity_prompt] + [frames[f] for f in fp.order])
                        for fp in plan])


class OnePromptStoryEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitOnePromptStoryEncode",
            display_name="One-Prompt Story Encode (1Prompt1Story)",
            category="StoryKit/One-Prompt-One-Story",
            description="Writes the identity prompt and all frame descriptions into one prompt per frame, then "
                        "reweights the text embedding so each frame's own description dominates (SVR). Gives one "
                        "CONDITIONING row per frame, in one batch: use a latent batch of `frames` pictures.",
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.5 or SDXL). LoRAs and CLIP Set Last "
                              "Layer applied before this node are kept."),
                io.String.Input("identity_prompt", multiline=True,
                                default="a watercolor illustration of a fox wearing a red scarf",
                                tooltip="Who the story is about and the style, said once; every frame starts with "
                                        "it. Keep it short: it shares CLIP's 75 tokens with the frames."),
                io.String.Input("frame_prompts", multiline=True,
                                default="reading a book under a tree\nrunning through a snowy forest\n"
                                        "sleeping by a campfire",
                                tooltip="One line per picture: what happens in that frame. Blank lines are "
                                        "skipped. Prompt weights (word:1.2) and embedding:name work."),
                io.Int.Input("window", default=10, min=1, max=64,
                             tooltip="How many frame descriptions each consolidated prompt may hold (paper: 10). "
                                     "Shrunk automatically until every prompt fits in 75 tokens; more frames in "
                                     "the prompt = stronger identity sharing."),
                io.Combo.Input("mode", options=MODES, default="SVR",
                               tooltip="SVR: singular-value reweighting (the paper's method, the code's order). "
                                       "NPR: naive reweighting (frame x2, other frames x0.5), the paper's "
                                       "baseline. none: consolidated prompt only."),
                io.Float.Input("express_alpha", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="SVR strength for the frame's own words: singular values grow by "
                                       "exp(alpha*S) (reference 0.01). Higher = the frame's action shows more."),
                io.Float.Input("express_beta", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="SVR scale for the frame's own words (reference 1.0)."),
                io.Float.Input("suppress_alpha", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="SVR strength for the other frames' words: singular values shrink by "
                                       "exp(-alpha*S) (reference 0.01). Higher = less leakage between frames."),
                io.Float.Input("suppress_beta", default=0.05, min=0.0, max=10.0, step=0.01,
                               tooltip="SVR scale for the other frames' words (reference 0.05). Lower = other "
                                       "frames' content fades further."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Custom(IDENTITY_TYPE).Output(display_name="identity"),
                io.Int.Output(display_name="frames"),
                io.String.Output(display_name="prompts"),
            ],
        )

    @classmethod
    def execute(cls, clip, identity_prompt, frame_prompts, window, mode, express_alpha, express_beta,
                suppress_alpha, suppress_beta) -> io.NodeOutput:
        story = plan_story(clip, identity_prompt, frame_prompts, window)
        constants = ops.SVRConstants(express_alpha, express_beta, suppress_alpha, suppress_beta)
        encoded: dict[tuple, dict] = {}
        rows, pooled = [], []
        for fp, tokens, sets in zip(story.plan, story.tokens, story.sets, strict=True):
            if fp.order not in encoded:
                encoded[fp.order] = encode(clip, tokens)
            enc = encoded[fp.order]
            rows.append(reweight(enc["cond"][0], sets, mode, channel_parts(tokens, enc["cond"].shape[-1]), constants))
            pooled.append(enc["pooled_output"])
        extra = {k: v for k, v in next(iter(encoded.values())).items() if k not in ("cond", "pooled_output")}
        if all(p is not None for p in pooled):
            extra["pooled_output"] = torch.cat(pooled, dim=0)
        alone = encode(clip, assemble(clip, [story.identity]))["cond"][:, :story.identity_len + 1]
        info = StoryIdentity(story.identity_len + 1, ops.CONTEXT_LENGTH, alone, len(story.frames))
        return io.NodeOutput([[torch.stack(rows), extra]], info, len(story.frames), "\n".join(story.texts))


# ------------------------------------------------------------------------------------------------ IPCA
class IPCAState:
    """Per-model IPCA settings and per-run state (the dropout generator), reset on pre-run, dropped on cleanup."""

    def __init__(self, identity: StoryIdentity, exact: bool, dropout: float, seed: int):
        self.identity, self.exact, self.dropout, self.seed = identity, exact, dropout, seed
        self.generator: torch.Generator | None = None
        self.bias_cache: dict[tuple, torch.Tensor] = {}

    def on_pre_run(self, patcher=None):
        self.generator = torch.Generator().manual_seed(self.seed)

    def on_cleanup(self, patcher=None):
        self.generator = None
        self.bias_cache.clear()

    def keep(self, shape, columns: torch.Tensor) -> torch.Tensor | None:
        if self.dropout <= 0.0:
            return None
        if self.generator is None:
            self.on_pre_run()
        return ops.dropout_keep(shape, self.dropout, columns, self.generator)

    # attn2_patch (concatenated path only): append P0's own encoding to every row's context
    def extend_context(self, n, context, value, extra_options):
        ident = self.identity
        repeats = max(1, context.shape[1] // ident.context_length)
        extra = ident.identity_context.to(context).expand(context.shape[0], -1, -1).repeat(1, repeats, 1)
        value = context if value is None else value
        return n, torch.cat([context, extra], dim=1), torch.cat([value, extra.to(value)], dim=1)

    # attn2 replace: IPCA on cond rows, the host's plain attention on uncond rows
    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        kwargs = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}
        ident = self.identity
        length = k.shape[1]
        if self.exact:      # the attn2 patch appended P0 once per context copy
            length = length // (ident.context_length + ident.identity_count) * ident.context_length
        outs = []
        for kind, rows in row_runs(extra_options.get("cond_or_uncond") or [0], q.shape[0]):
            if kind != 0:   # uncond: exactly what the unpatched layer computes
                outs.append(host_attention.optimized_attention(q[rows], k[rows, :length], v[rows, :length], heads,
                                                               **kwargs))
            elif self.exact:
                outs.append(self._concatenated(q[rows], k[rows], v[rows], length, heads, kwargs))
            else:
                outs.append(self._biased(q[rows], k[rows], v[rows], heads, kwargs))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _biased(self, q, k, v, heads, kwargs):
        key = (k.shape[1], q.dtype, q.device)
        if self.dropout > 0.0:
            columns = ops.identity_columns(k.shape[1], self.identity.identity_count, self.identity.context_length)
            keep = self.keep((q.shape[0], 1, q.shape[1], k.shape[1]), columns)
            mask = ops.ipca_bias(columns, keep, dtype=q.dtype).to(q.device)
        elif key in self.bias_cache:
            mask = self.bias_cache[key]
        else:
            columns = ops.identity_columns(k.shape[1], self.identity.identity_count, self.identity.context_length)
            mask = self.bias_cache[key] = ops.ipca_bias(columns, dtype=q.dtype).to(q.device).view(1, 1, 1, -1)
        return host_attention.optimized_attention_masked(q, k, v, heads, mask=mask, **kwargs)

    def _concatenated(self, q, k, v, length, heads, kwargs):
        if self.dropout <= 0.0:
            return host_attention.optimized_attention(q, k, v, heads, **kwargs)
        appended = torch.arange(k.shape[1]) >= length
        keep = self.keep((q.shape[0], 1, q.shape[1], k.shape[1]), appended)
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf")).to(q.device)
        return host_attention.optimized_attention_masked(q, k, v, heads, mask=mask, **kwargs)


def row_runs(cond_or_uncond: list[int], batch: int) -> list[tuple[int, slice]]:
    """The batch as runs of consecutive rows of one kind (0 cond, 1 uncond), as slices: no copies."""
    per = batch // len(cond_or_uncond)
    runs: list[tuple[int, slice]] = []
    for index, kind in enumerate(cond_or_uncond):
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, slice(runs[-1][1].start, (index + 1) * per))
        else:
            runs.append((kind, slice(index * per, (index + 1) * per)))
    return runs


def cross_attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """(block, number, transformer_index) of every transformer block with cross-attention, as the host keys them."""
    found = []
    groups = [("input", getattr(diffusion_model, "input_blocks", None)),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", None))]
    for name, blocks in groups:
        for number, block in enumerate(blocks or []):
            if block is None:
                continue
            for module in block.modules():
                for index, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        found.append((name, number, index))
    return found


class IdentityPreservingCrossAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitIdentityPreservingCrossAttention",
            display_name="Identity-Preserving Cross-Attention (IPCA)",
            category="StoryKit/One-Prompt-One-Story",
            description="Patches every cross-attention layer so the positive rows attend to the identity prompt "
                        "twice over (IPCA): the character stays the same across frames. Negative rows and all "
                        "other layers are untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's MODEL (SD1.5 or SDXL UNet); LoRAs may be applied "
                               "before or after."),
                io.Custom(IDENTITY_TYPE).Input("identity", tooltip="From One-Prompt Story Encode: which prompt "
                                               "columns are the identity."),
                io.Combo.Input("path", options=IPCA_PATHS, default=IPCA_PATHS[0],
                               tooltip="bias: a ln 2 logit bias on the identity columns, mathematically the same "
                                       "as the paper's concatenation and as fast as plain attention. concatenated: "
                                       "the paper's literal keys/values concatenation (slower; an exactness check)."),
                io.Float.Input("dropout", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Chance to drop each added identity column per pixel (reference code 0, "
                                       "paper 0.5). Higher = looser identity, more variety."),
                io.Int.Input("dropout_seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the identity-column dropout; only used when dropout > 0."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, identity, path, dropout, dropout_seed) -> io.NodeOutput:
        node = "StoryKit IPCA"
        if not isinstance(identity, StoryIdentity):
            raise ValueError(f"{node}: identity must come from One-Prompt Story Encode")
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if context_dim is not None and context_dim != identity.identity_context.shape[-1]:
            raise ValueError(f"{node}: the identity was encoded with a {identity.identity_context.shape[-1]}-wide "
                             f"CLIP but this MODEL expects {context_dim}; use the CLIP of the same checkpoint")
        blocks = cross_attention_blocks(model.model.diffusion_model)
        if not blocks:
            raise ValueError(f"{node}: this MODEL has no UNet cross-attention blocks; IPCA supports SD1.5 and SDXL")
        m = model.clone()
        state = IPCAState(identity, path == IPCA_PATHS[1], float(dropout), int(dropout_seed))
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for name, number, index in blocks:
            if (name, number, index) in replaces:
                log.warning("%s: replacing another attn2 patch on %s", node, (name, number, index))
            m.set_model_attn2_replace(state, name, number, index)
        if state.exact:
            m.set_model_attn2_patch(state.extend_context)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, PATCH_KEY, state.on_pre_run)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, PATCH_KEY, state.on_cleanup)
        return io.NodeOutput(m)


# ------------------------------------------------------------------------------------------------ shared noise
class SharedNoiseSource:
    """A NOISE for SamplerCustomAdvanced: the first frame's noise from `seed`, repeated for every frame."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if getattr(samples, "is_nested", False):
            raise ValueError("StoryKit Shared Noise: nested (multi-part) latents are not supported")
        one = comfy.sample.prepare_noise(samples[:1], self.seed)
        return one.repeat((samples.shape[0],) + (1,) * (samples.ndim - 1))


class SharedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitSharedNoise",
            display_name="Shared Noise (same start for every frame)",
            category="StoryKit/One-Prompt-One-Story",
            description="NOISE for SamplerCustomAdvanced that gives every picture of the batch the same initial "
                        "noise, as 1Prompt1Story does: frames then differ only by their prompts.",
            inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff,
                                 control_after_generate=True,
                                 tooltip="Seed of the one noise image every frame starts from.")],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise_seed) -> io.NodeOutput:
        return io.NodeOutput(SharedNoiseSource(noise_seed))


class SharedNoiseLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitSharedNoiseLatent",
            display_name="Shared Noise Latent (for KSampler)",
            category="StoryKit/One-Prompt-One-Story",
            description="Marks a latent batch so the stock KSampler (and RandomNoise) give every frame the same "
                        "initial noise: each frame gets the noise of the batch's first picture for the seed.",
            inputs=[io.Latent.Input("samples", tooltip="The latent batch, one picture per frame (e.g. Empty "
                                    "Latent Image with batch_size = frames).")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        out = dict(samples)
        first = samples.get("batch_index", [0])[0]
        out["batch_index"] = [first] * samples["samples"].shape[0]
        return io.NodeOutput(out)


NODES = [OnePromptStoryEncode, IdentityPreservingCrossAttention, SharedNoise, SharedNoiseLatent]
