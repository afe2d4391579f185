"""One-Prompt-One-Story nodes: the story encoder (consolidation + SVR), IPCA on the host's MODEL, shared noise."""
from __future__ import annotations

import dataclasses
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


# The text encoders of each family, as clip.tokenize names them: the name users read, the keys whose tokens are rows
# of the CONDITIONING (FLUX.1's CLIP-L gives only the pooled vector) and whether the encoder is causal (IPCA's bias
# is then exact).
ENCODERS = {
    ("l",): "CLIP-L (SD1.5)",
    ("g", "l"): "CLIP-L + CLIP-G (SDXL)",
    ("l", "t5xxl"): "T5-XXL + CLIP-L (FLUX.1)",
    ("t5xxl",): "T5-XXL (Chroma)",
    ("g", "l", "t5xxl"): "CLIP-L/G + T5-XXL (SD3.5)",
    ("qwen25_7b",): "Qwen2.5-VL (Qwen-Image)",
    ("qwen3_4b",): "Qwen3 (Z-Image)",
    ("mistral3_24b",): "Mistral 3 Small (FLUX.2)",
}
CAUSAL = {"l", "g", "qwen25_7b", "qwen3_4b", "mistral3_24b"}
POOLED_ONLY = {("l", "t5xxl"): {"l"}}
# Encoders whose CONDITIONING puts several hidden states side by side in the channels (FLUX.2: Mistral layers 10, 20
# and 30): SVR reweights each hidden state on its own, as each is an embedding of its own.
STACKED_STATES = {("mistral3_24b",): 3}


@dataclass(frozen=True)
class StoryIdentity:
    """What IPCA needs from the encoder: how many leading columns are the identity (start token + P0), the
    context length they repeat with, and P0 encoded alone (for the concatenated path).

    encoder: the tokenizer keys (ENCODERS) the story was encoded with; identity_rows: the CONDITIONING rows of the
    identity (prefix + P0) in every frame's context; causal: those rows equal P0's own encoding (causal encoders);
    identity_context holds P0 alone at the same rows, in the same order. DiTs: context_length is the frames' own
    context rows (a model that pads the text in front, FLUX.2, moves identity_rows by its padding)."""
    identity_count: int
    context_length: int
    identity_context: torch.Tensor      # [1, identity rows, D]
    frames: int
    encoder: tuple = ("l",)
    identity_rows: tuple = ()
    causal: bool = True

    @property
    def encoder_name(self) -> str:
        return ENCODERS.get(self.encoder, "+".join(self.encoder))


# ------------------------------------------------------------------------------------------------ tokens
@dataclass(frozen=True)
class Tokenizer:
    """One text encoder's framing, read from the host's own tokenization of "" (clip.tokenize output key `key`):
    the tokens it puts before and after the text (CLIP: start / end; T5: - / </s>; the LLM encoders: the chat
    template the host adds), its padding and the content budget (CLIP: 75 per 77-token chunk; others: none)."""
    key: str
    prefix: tuple
    suffix: tuple
    pad: tuple | None
    length: int                 # pad every prompt to at least this many positions (CLIP 77, FLUX.1's T5 256)
    budget: int | None
    joiner: str                 # put before every segment after the first (byte-level BPE keeps its spaces)
    by_word_id: bool            # the tokenizer marks its own tokens with word id 0 (CLIP, T5), else by position


def _sub_tokenizer(tokenizer, key: str):
    for name in (key, f"clip_{key}", getattr(tokenizer, "clip", "")):
        sub = getattr(tokenizer, name, None) if name else None
        if sub is not None and hasattr(sub, "max_length"):
            return sub
    return None


def tokenizers(clip) -> dict[str, Tokenizer]:
    """Each encoder's framing, from the host's tokenizer (so template prefixes and padding are the host's own)."""
    out = {}
    empty = clip.tokenize("", return_word_ids=True)
    probes = [clip.tokenize(t, return_word_ids=True) for t in ("storykit", " storykit")]
    for key in sorted(empty):
        template = [tuple(t) for batch in empty[key] for t in batch]
        sub = _sub_tokenizer(clip.tokenizer, key)
        pad_id = getattr(sub, "pad_token", None)
        probe = [t[0] for t in probes[0][key][0]]
        p = 0
        while p < min(len(template), len(probe)) and template[p][0] == probe[p]:
            p += 1
        rest = template[p:]
        n = len(rest)
        while n and pad_id is not None and rest[n - 1][0] == pad_id:
            n -= 1
        if n < len(rest) and pad_id is not None and getattr(sub, "end_token", None) == pad_id:
            n += 1              # CLIP-L pads with its end token: keep one as the end
        fixed = bool(getattr(sub, "pad_to_max_length", False)) if sub is not None else len(template) == len(probe)
        budget = (getattr(sub, "max_length", ops.CONTEXT_LENGTH) - p - n) if fixed else None
        by_word_id = all(t[2] == 0 for t in template)
        tok = Tokenizer(key, tuple(t[:2] for t in template[:p]), tuple(t[:2] for t in rest[:n]),
                        tuple(rest[-1][:2]) if n < len(rest) else None, len(template), budget, "", by_word_id)
        spaced = [content_of(tok, pr[key]) for pr in probes]
        out[key] = tok if [t[0] for t in spaced[0]] == [t[0] for t in spaced[1]] else \
            dataclasses.replace(tok, joiner=" ")
    return out


def content_positions(tok: Tokenizer, batches) -> list[int]:
    """Where the text's own tokens sit in one key's tokenize output (its chunks laid end to end), without the
    framing (start, end, template and padding tokens)."""
    flat = [t for batch in batches for t in batch]
    if tok.by_word_id:          # word id 0 marks the tokens the tokenizer adds itself
        return [i for i, t in enumerate(flat) if t[2] != 0]
    return list(range(len(tok.prefix), len(flat) - len(tok.suffix)))


def content_of(tok: Tokenizer, batches) -> list[tuple]:
    """The text's own tokens in one key's tokenize output (without the framing), as (token, weight)."""
    flat = [t for batch in batches for t in batch]
    return [(flat[i][0], flat[i][1]) for i in content_positions(tok, batches)]


def content_tokens(clip, text: str, toks: dict[str, Tokenizer] | None = None, first: bool = True
                   ) -> dict[str, list[tuple]]:
    """The host's tokenization of `text` without its framing, per encoder ("l"; "l", "g" for SDXL; "t5xxl"; ...).

    Weights and embedding vectors stay as the host made them. Segments after the first are tokenized with the
    joiner in front, so on byte-level BPE (Qwen) they are the tokens they are inside the joined text."""
    toks = toks or tokenizers(clip)
    out = {}
    for key, tok in toks.items():
        piece = text if first or not tok.joiner else tok.joiner + text
        out[key] = content_of(tok, clip.tokenize(piece, return_word_ids=True)[key])
    return out


def segment_length(segment: dict[str, list], what: str, keys=None) -> dict[str, int]:
    """Tokens per encoder; CLIP-L and CLIP-G must agree (one set of positions for both halves of the context)."""
    lengths = {k: len(v) for k, v in segment.items() if keys is None or k in keys}
    clips = {lengths[k] for k in ("l", "g") if k in lengths}
    if len(clips) > 1:
        raise ValueError(f"{ENCODER}: the text encoders tokenize {what} to different lengths {sorted(clips)}")
    return lengths


def assemble(clip, segments: list[dict[str, list]], length: int | None = None,
             toks: dict[str, Tokenizer] | None = None) -> dict[str, list]:
    """prefix + segments + suffix + padding, with the host's own framing tokens (from tokenizing "")."""
    toks = toks or tokenizers(clip)
    out = {}
    for key, tok in toks.items():
        if not all(key in seg for seg in segments):
            continue
        body = list(tok.prefix) + [t for seg in segments for t in seg[key]] + list(tok.suffix)
        target = max(length or 0, tok.length if tok.pad is not None else 0)
        out[key] = [body + [tok.pad] * (target - len(body)) if tok.pad is not None else body]
    return out


def channel_parts(tokens: dict, width: int) -> list[int]:
    """Channel slices of the context per text encoder: SD1.5 one part; SDXL CLIP-L 768 then CLIP-G 1280."""
    keys = set(tokens)
    if keys == {"l", "g"} and width > 768:
        return [768, width - 768]
    if len(keys) == 1:
        return [width]
    raise ValueError(f"{ENCODER}: this CLIP has text encoders {sorted(keys)}; supported: "
                     + "; ".join(ENCODERS.values()))


def encoder_of(clip_keys) -> tuple:
    keys = tuple(sorted(clip_keys))
    if keys not in ENCODERS:
        raise ValueError(f"{ENCODER}: this CLIP has text encoders {list(keys)}; supported: "
                         + "; ".join(ENCODERS.values()))
    return keys


def row_parts(encoder: tuple, tokens: dict, cond_len: int, width: int) -> list[tuple[str, int, list[slice]]]:
    """Where each encoder's token positions land in the CONDITIONING: (key, row offset, channel slices).

    SD1.5/SDXL: rows = CLIP positions (SDXL: CLIP-L channels 0-767, CLIP-G 768-2047). SD3.5: CLIP-L/G on rows
    0-76 (channels 0-767, 768-2047; the rest is zero padding), T5 after them with all 4096 channels. One-encoder
    DiTs: the encoder's positions, less the template head the host drops (Qwen-Image); FLUX.2: one channel slice
    per stacked hidden state (STACKED_STATES)."""
    keys = [k for k in encoder if k not in POOLED_ONLY.get(encoder, ())]
    if "l" in keys and "g" in keys:
        clip_len = len(tokens["l"][0])
        parts = [("l", 0, [slice(0, 768)]), ("g", 0, [slice(768, 2048 if "t5xxl" in keys else width)])]
        if "t5xxl" in keys:
            parts.append(("t5xxl", clip_len, [slice(0, width)]))
        return parts
    if len(keys) == 1:
        states = STACKED_STATES.get(encoder, 1)
        return [(keys[0], cond_len - len(tokens[keys[0]][0]), _slices([width // states] * states))]
    raise ValueError(f"{ENCODER}: no row layout for text encoders {list(encoder)}")


def encode(clip, tokens: dict, length: int | None = ops.CONTEXT_LENGTH) -> dict:
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    if length is not None and out["cond"].shape[1] != length:
        raise ValueError(f"{ENCODER}: the text encoder returned {out['cond'].shape[1]} positions, expected "
                         f"{length}")
    return out


def reweight(embeds: torch.Tensor, sets, mode: str, parts, constants: ops.SVRConstants) -> torch.Tensor:
    """SVR / NPR on one frame's context [T, D]. sets: TokenSets (then parts are channel widths: SD1.5/SDXL) or a
    list of (TokenSets in CONDITIONING rows, channel slices) per encoder."""
    if isinstance(sets, ops.TokenSets):
        sets = [(sets, _slices(parts))]
    out = embeds.clone()
    if mode == "SVR":
        for rows, slices in sets:
            for ch in slices:
                out[:, ch] = ops.svr(out[:, ch], rows, constants)
    elif mode == "NPR":
        for rows, _ in {r.express: (r, s) for r, s in sets}.values():
            out = ops.naive_prompt_reweight(out, rows)
    return out


def _slices(widths: list[int]) -> list[slice]:
    edges = [0]
    for w in widths:
        edges.append(edges[-1] + w)
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False)]


def frame_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class Story:
    """The consolidated prompts of a story: per frame its FramePrompt, assembled tokens, token sets and text.
    sets: positions of the first row encoder (CLIP-L on SD1.5/SDXL, T5 on FLUX.1); key_sets: every encoder's."""
    frames: list[str]
    identity: dict[str, list]
    identity_len: int
    plan: list[ops.FramePrompt]
    tokens: list[dict[str, list]]
    sets: list[ops.TokenSets]
    texts: list[str]
    encoder: tuple = ("l",)
    key_sets: dict = None
    toks: dict = None


def plan_story(clip, identity_prompt: str, frame_prompts: str, window: int) -> Story:
    """Tokenize P0 and each frame once on the host's tokenizer, consolidate, and assemble each frame's prompt."""
    frames = frame_lines(frame_prompts)
    identity_prompt = identity_prompt.strip()
    if not identity_prompt:
        raise ValueError(f"{ENCODER}: identity_prompt is empty; describe the character (and style) once there")
    if not frames:
        raise ValueError(f"{ENCODER}: frame_prompts has no lines; write one line per picture")
    toks = tokenizers(clip)
    encoder = encoder_of(toks)
    pooled_only = POOLED_ONLY.get(encoder, set())
    rows = [k for k in encoder if k not in pooled_only]
    identity = content_tokens(clip, identity_prompt, toks)
    segments = [content_tokens(clip, f, toks, first=False) for f in frames]
    n0 = segment_length(identity, "the identity prompt", rows)
    lens = [segment_length(s, f"frame {i + 1}", rows) for i, s in enumerate(segments)]
    try:
        plan = ops.consolidate_encoders({k: (n0[k], [n[k] for n in lens]) for k in rows},
                                        {k: toks[k].budget for k in rows}, window)
    except ops.StoryTooLong as e:
        k = e.key
        raise ValueError(f"{ENCODER}: identity_prompt ({n0[k]} tokens) + frame {e.frame + 1} ({lens[e.frame][k]} "
                         f"tokens) is {e.over} token(s) over {toks[k].budget} ({ENCODERS[encoder]}, {k}); "
                         "shorten the identity prompt or that frame line") from e
    texts = [" ".join([identity_prompt] + [frames[f] for f in fp.order]) for fp in plan]
    row_toks = {k: toks[k] for k in rows}
    tokens = [assemble(clip, [identity] + [segments[f] for f in fp.order], toks=row_toks) for fp in plan]
    for tk, text in zip(tokens, texts, strict=True):
        for k in pooled_only:       # FLUX.1's CLIP-L: the host's own tokenization (its first chunk is pooled)
            tk[k] = clip.tokenize(text)[k]
    longest = {k: max(len(tk[k][0]) for tk in tokens) for k in rows}
    for tk in tokens:               # windows of different lengths: pad to one length (the host masks padding)
        for k in rows:
            if len(tk[k][0]) < longest[k]:
                pad = toks[k].pad or (_sub_tokenizer(clip.tokenizer, k).pad_token, 1.0)
                tk[k] = [tk[k][0] + [pad] * (longest[k] - len(tk[k][0]))]
    key_sets = {k: [ops.token_sets(n0[k], [n[k] for n in lens], fp, longest[k], len(toks[k].prefix))
                    for fp in plan] for k in rows}
    return Story(frames, identity, n0[rows[0]], plan, tokens=tokens, sets=key_sets[rows[0]],
                 texts=[f"frame {fp.express + 1}: " + t for fp, t in zip(plan, texts, strict=True)],
                 encoder=encoder, key_sets=key_sets, toks=toks)


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
                io.Clip.Input("clip", tooltip="The model's text encoder: the checkpoint's CLIP (SD1.5, SDXL, SD3.5) "
                              "or the loader's (FLUX.1 DualCLIPLoader flux, FLUX.2 Mistral 3, Chroma T5, "
                              "Qwen-Image Qwen2.5-VL, Z-Image Qwen3). LoRAs and CLIP Set Last Layer applied before this node are kept."),
                io.String.Input("identity_prompt", multiline=True,
                                default="a watercolor illustration of a fox wearing a red scarf",
                                tooltip="Who the story is about and the style, said once; every frame starts with "
                                        "it. Keep it short: on CLIP (SD1.5, SDXL, SD3.5) it shares 75 tokens with "
                                        "the frames (T5 and the LLM encoders have no such limit)."),
                io.String.Input("frame_prompts", multiline=True,
                                default="reading a book under a tree\nrunning through a snowy forest\n"
                                        "sleeping by a campfire",
                                tooltip="One line per picture: what happens in that frame. Blank lines are "
                                        "skipped. Prompt weights (word:1.2) and embedding:name work."),
                io.Int.Input("window", default=10, min=1, max=64,
                             tooltip="How many frame descriptions each consolidated prompt may hold (paper: 10). "
                                     "Shrunk automatically until every prompt fits CLIP's 75 tokens (T5, LLMs: no limit); more frames in "
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
        clip_only = story.encoder in (("l",), ("g", "l"))
        length = ops.CONTEXT_LENGTH if clip_only else None
        encoded: dict[tuple, dict] = {}
        rows, outs, first_layout = [], [], None
        for j, (fp, tokens, sets) in enumerate(zip(story.plan, story.tokens, story.sets, strict=True)):
            if fp.order not in encoded:
                encoded[fp.order] = encode(clip, tokens, length)
            enc = encoded[fp.order]
            cond = enc["cond"][0]
            if clip_only:
                rows.append(reweight(cond, sets, mode, channel_parts(tokens, cond.shape[-1]), constants))
            else:
                layout = row_parts(story.encoder, tokens, cond.shape[0], cond.shape[-1])
                first_layout = first_layout if j else layout
                parts = [(ops.shift_sets(story.key_sets[k][j], offset), slices) for k, offset, slices in layout]
                rows.append(reweight(cond, parts, mode, None, constants))
            outs.append(enc)
        if len({r.shape for r in rows}) > 1:
            raise ValueError(f"{ENCODER}: the frames' prompts encoded to different lengths "
                             f"{sorted({r.shape[0] for r in rows})}; use a window that holds every frame")
        extra = {}
        for key, value in outs[0].items():   # pooled output, attention mask: one row per frame, as the host gave
            if key == "cond":
                continue
            extra[key] = torch.cat([o[key] for o in outs], dim=0) if isinstance(value, torch.Tensor) else value
        info = identity_of(clip, story, identity_prompt, length, first_layout, rows[0].shape[0])
        return io.NodeOutput([[torch.stack(rows), extra]], info, len(story.frames), "\n".join(story.texts))


def identity_of(clip, story: Story, identity_prompt: str, length: int | None, frame_parts,
                frame_rows: int = 0) -> StoryIdentity:
    """P0 alone through the same encoder, and where its rows sit in the frames' contexts and in its own."""
    alone_tokens = assemble(clip, [story.identity], toks={k: story.toks[k] for k in story.key_sets})
    for k in POOLED_ONLY.get(story.encoder, ()):
        alone_tokens[k] = clip.tokenize(identity_prompt.strip())[k]
    alone = encode(clip, alone_tokens, length)["cond"]
    if length is not None:      # SD1.5 / SDXL: the start token and P0 lead the 77 positions
        count = story.identity_len + 1
        return StoryIdentity(count, ops.CONTEXT_LENGTH, alone[:, :count], len(story.frames), story.encoder,
                             tuple(range(count)), True)
    alone_offsets = {k: off for k, off, _ in row_parts(story.encoder, alone_tokens, alone.shape[1], alone.shape[-1])}
    rows, alone_rows, causal = [], [], True
    for k, offset, _ in frame_parts:
        if k == "g":
            continue            # CLIP-G shares CLIP-L's rows (other channels)
        ident = story.key_sets[k][0].identity
        keep = [r for r in ident if r + offset >= 0 and r + alone_offsets[k] >= 0]
        rows += [r + offset for r in keep]
        alone_rows += [r + alone_offsets[k] for r in keep]
        causal = causal and k in CAUSAL
    return StoryIdentity(len(rows), frame_rows, alone[:, alone_rows], len(story.frames), story.encoder, tuple(rows),
                         causal)


# ------------------------------------------------------------------------------------------------ IPCA
class IPCAState:
    """Per-model IPCA settings and per-run state (the dropout generator), reset on pre-run, dropped on cleanup."""

    def __init__(self, identity: StoryIdentity, exact: bool, dropout: float, seed: int):
        self.identity, self.exact, self.dropout, self.seed = identity, exact, dropout, seed
        self.generator: torch.Generator | None = None
        self.bias_cache: dict[tuple, torch.Tensor] = {}
        self.copies: torch.Tensor | None = None  # bool [B, blocks] of the layer being run, from mark_copies

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

    # attn2_patch (both paths, first): which context_length blocks of each row's context repeat its first block.
    # The host repeats a context to a common length (copies: the identity is in each); Conditioning Concat joins
    # other prompts (not copies: no identity columns there).
    def mark_copies(self, n, context, value, extra_options):
        period = self.identity.context_length
        blocks, rest = divmod(context.shape[1], period)
        self.copies = None
        if blocks > 1 and not rest:
            view = context.view(context.shape[0], blocks, period, -1)
            copies = (view == view[:, :1]).flatten(2).all(-1)
            if not bool(copies.all()):
                self.copies = copies
                cond = [rows for kind, rows in row_runs(extra_options.get("cond_or_uncond") or [0], copies.shape[0])
                        if kind == 0]
                if self.exact and any(not bool(copies[rows].all()) for rows in cond):
                    raise ValueError("StoryKit IPCA: the positive conditioning joins other prompts to One-Prompt "
                                     "Story Encode's (Conditioning Concat); the concatenated path cannot place the "
                                     "identity in them. Use the bias path, or wire the encoder's conditioning "
                                     "straight to the sampler.")
        return n, context, value

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
                outs.append(self._biased(q[rows], k[rows], v[rows], heads, kwargs,
                                         None if self.copies is None else self.copies[rows]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _biased(self, q, k, v, heads, kwargs, copies=None):
        key = (k.shape[1], q.dtype, q.device)
        if self.dropout > 0.0 or copies is not None:
            columns = ops.identity_columns(k.shape[1], self.identity.identity_count, self.identity.context_length)
            if copies is not None:  # identity columns only in the blocks that repeat the encoder's prompt
                columns = columns & copies[:, torch.arange(k.shape[1]) // self.identity.context_length]
                columns = columns.view(q.shape[0], 1, 1, -1)
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
            description="Patches every cross-attention layer (UNet) or joint-attention block (DiT: image tokens "
                        "only) so the positive rows attend to the identity prompt twice over (IPCA): the character "
                        "stays the same across frames. Negative rows and text tokens are untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL: SD1.5/SDXL UNet, or FLUX.1, Chroma, Qwen-Image, Z-Image, "
                               "SD3.5 (joint attention); LoRAs may be applied before or after."),
                io.Custom(IDENTITY_TYPE).Input("identity", tooltip="From One-Prompt Story Encode: which prompt "
                                               "columns are the identity."),
                io.Combo.Input("path", options=IPCA_PATHS, default=IPCA_PATHS[0],
                               tooltip="bias: a ln 2 logit bias on the identity columns. Exact (the paper's "
                                       "concatenation) for causal text encoders: CLIP (SD1.5, SDXL), Qwen2.5-VL "
                                       "(Qwen-Image), Qwen3 (Z-Image), Mistral 3 (FLUX.2). On T5 (FLUX.1, Chroma, SD3.5) it is an "
                                       "APPROXIMATION: T5 reads P0 in the context of the frames. concatenated: "
                                       "the identity prompt encoded alone is added (exact for every encoder; on a "
                                       "DiT it runs P0 as extra text rows of each frame, a little slower)."),
                io.Float.Input("dropout", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Chance to drop each added identity column per pixel (reference code 0, "
                                       "paper 0.5). Higher = looser identity, more variety. SD1.5/SDXL only."),
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
        from . import ipca_patch
        expected = ipca_patch.expected_encoder(model)
        if expected is not None:        # a DiT: joint attention, by family
            keys, name = expected
            if keys is None:
                raise ValueError(f"{node}: this MODEL ({type(model.model).__name__}) expects the text encoder "
                                 f"{name}; One-Prompt-One-Story supports " + "; ".join(ENCODERS.values()))
            if tuple(identity.encoder) != keys:
                raise ValueError(f"{node}: the identity was encoded with {identity.encoder_name}, but this MODEL "
                                 f"({type(model.model).__name__}) expects {name}; encode the story with that "
                                 "model's own text encoder")
            if dropout > 0:
                raise ValueError(f"{node}: dropout is for SD1.5/SDXL UNets only; set dropout to 0 on "
                                 f"{type(model.model).__name__}")
            exact = path == IPCA_PATHS[1] and not identity.causal   # causal encoders: the bias path is exact
            return io.NodeOutput(ipca_patch.patch_dit(model, identity, exact, node))
        if tuple(identity.encoder) not in (("l",), ("g", "l")):
            raise ValueError(f"{node}: the identity was encoded with {identity.encoder_name}, but this MODEL "
                             f"({type(model.model).__name__}) expects CLIP-L (SD1.5) or CLIP-L + CLIP-G (SDXL); "
                             "use the CLIP of the same checkpoint")
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if context_dim is not None and context_dim != identity.identity_context.shape[-1]:
            raise ValueError(f"{node}: the identity was encoded with a {identity.identity_context.shape[-1]}-wide "
                             f"CLIP but this MODEL expects {context_dim}; use the CLIP of the same checkpoint")
        blocks = cross_attention_blocks(model.model.diffusion_model)
        if not blocks:
            raise ValueError(f"{node}: {type(model.model).__name__} is not a model StoryKit can patch; IPCA supports "
                             "SD1.5/SDXL UNets, FLUX.1, Chroma, Qwen-Image, Z-Image and SD3.5")
        m = model.clone()
        state = IPCAState(identity, path == IPCA_PATHS[1], float(dropout), int(dropout_seed))
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for name, number, index in blocks:
            if (name, number, index) in replaces:
                log.warning("%s: replacing another attn2 patch on %s", node, (name, number, index))
            m.set_model_attn2_replace(state, name, number, index)
        m.set_model_attn2_patch(state.mark_copies)
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
