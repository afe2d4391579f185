"""Where each character's description sits in a Story Prompt frame's conditioning rows (for automatic masks).

The Story Prompt replaces [Name] by the character's description; identity routing reads the model's attention from
the image tokens to those text tokens. Positions come from the host's own tokenizer of each text encoder (CLIP-L,
CLIP-L + G sharing rows, T5, SD3.5's CLIP rows then its T5 rows, the Qwen chat templates), placed on the rows as the
One-Prompt Story encoder places them (`row_parts`).
"""
from __future__ import annotations

import logging

import torch

from . import nodes_one_prompt_story as one_prompt

log = logging.getLogger("storykit")


def _key(token):
    """A token id, or an embedding vector (embedding:name) by shape and sum, comparable across tokenizations."""
    return token if isinstance(token, int) else ("embedding", tuple(token.shape), round(float(token.sum()), 4))


def _find(haystack: list, needle: list) -> list[int]:
    if not needle:
        return []
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


def _spans(content: list, variants: list[list]) -> list[tuple[int, int]]:
    """Where a description's tokens occur in a frame's content tokens (any of its tokenizations: at the start of
    the prompt, after a space); failing that, its inner tokens (the first and last may merge with their neighbours,
    e.g. "[Lena]'s hat")."""
    spans = {(s, s + len(v)) for v in variants for s in _find(content, v)}
    if not spans:
        spans = {(max(s - 1, 0), min(s + len(v) - 1, len(content))) for v in variants if len(v) > 2
                 for s in _find(content, v[1:-1])}
    return sorted(spans)


def description_tokens(clip, plan, lengths: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """{frame index: {name: LongTensor of the rows of the frame's CONDITIONING holding the name's description}},
    for every frame with characters. lengths: each frame's own conditioning rows (encode_frames)."""
    toks = one_prompt.tokenizers(clip)
    try:
        encoder = one_prompt.encoder_of(toks)
    except ValueError as error:
        log.warning("StoryKit Story Prompt: no automatic character masks for this text encoder (%s)", error)
        return {}
    rows = [k for k in encoder if k not in one_prompt.POOLED_ONLY.get(encoder, ())]
    keys = [k for k in rows if not (k == "g" and "l" in rows)]  # CLIP-G shares CLIP-L's rows (other channels)
    tokenized = [clip.tokenize(f.prompt, return_word_ids=True) if f.characters else None for f in plan.frames]
    every = [clip.tokenize(f.prompt) if t is None else t for f, t in zip(plan.frames, tokenized, strict=True)]
    # one-sequence encoders (T5, the LLMs) are padded to the story's longest frame by encode_frames
    longest = {k: max(len(t[k][0]) for t in every) for k in rows if all(len(t[k]) == 1 for t in every)}
    variants: dict[str, dict[str, list[list]]] = {}
    for name, description in plan.characters.items():
        text = " ".join(description.split())
        found = [one_prompt.content_tokens(clip, text, toks, first=first) for first in (True, False)]
        variants[name] = {k: [[_key(t[0]) for t in f[k]] for f in found] for k in keys}
    out: dict[int, dict[str, torch.Tensor]] = {}
    for frame, tokens, length in zip(plan.frames, tokenized, lengths, strict=True):
        if tokens is None:
            continue
        flat = {k: [t for batch in tokens[k] for t in batch] for k in rows}
        padded = {k: [flat[k] + [None] * (longest.get(k, 0) - len(flat[k]))] for k in rows}
        positions: dict[str, list[int]] = {name: [] for name in frame.characters}
        for key, offset, _ in one_prompt.row_parts(encoder, padded, length, 0):
            if key not in keys:
                continue
            where = one_prompt.content_positions(toks[key], tokens[key])
            content = [_key(flat[key][i][0]) for i in where]
            spans = {name: _spans(content, variants[name][key]) for name in frame.characters}
            for name, own in spans.items():  # a description inside a longer one's match is the longer one's
                others = [s for other, theirs in spans.items() if other != name for s in theirs]
                own = [(a, b) for a, b in own if not any(c <= a and b <= d and d - c > b - a for c, d in others)]
                positions[name] += [offset + where[i] for a, b in own for i in range(a, b) if offset + where[i] >= 0]
        found = {name: torch.tensor(sorted(set(p)), dtype=torch.long) for name, p in positions.items() if p}
        for name in frame.characters:
            if name not in found:
                log.warning("StoryKit Story Prompt: line %d: the description of [%s] was not found in the frame's "
                            "tokens; its automatic mask falls back to plain sharing", frame.line, name)
        out[frame.index] = found
    return out
