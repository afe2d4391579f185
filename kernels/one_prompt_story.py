"""One-Prompt-One-Story (Liu et al., ICLR 2025): prompt consolidation, Singular-Value Reweighting and the IPCA bias.

Plain torch, no host imports. Token positions are counted on the consolidated prompt
[prefix] + identity prompt P0 + frame descriptions + [suffix] + padding: on CLIP the prefix is the start token and
the whole is 77 positions; on T5 there is no prefix and the suffix is </s>; on the LLM encoders (Qwen2.5-VL, Qwen3)
prefix and suffix are the host's chat template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONTEXT_LENGTH = 77                 # CLIP's positions: start token, 75 content tokens, end token
CONTENT_BUDGET = CONTEXT_LENGTH - 2
IPCA_BIAS = math.log(2.0)           # softmax weight x2 on the identity columns == one extra copy of them (Sec. 3.3)


class StoryTooLong(ValueError):
    """The identity prompt leaves no room for frame `frame` in the 75-token budget; `over` tokens too many."""

    def __init__(self, frame: int, over: int):
        super().__init__(f"frame {frame + 1} does not fit: identity prompt + frame are {over} token(s) over the "
                         f"{CONTENT_BUDGET}-token budget")
        self.frame, self.over = frame, over


@dataclass(frozen=True)
class FramePrompt:
    """One frame's consolidated prompt: which frame descriptions follow P0, in order, and which one is expressed."""
    order: tuple[int, ...]
    express: int


@dataclass(frozen=True)
class TokenSets:
    """Row indices of one consolidated prompt (Sec. 3.2): express set, one suppress set per other frame, EOT."""
    identity: tuple[int, ...]           # start token and P0's tokens: the columns IPCA adds again
    express: tuple[int, ...]
    suppress: tuple[tuple[int, ...], ...]
    eot: tuple[int, ...]                # the end token and every padding position after it


def max_window(identity_len: int, frame_lens: list[int], window: int, budget: int | None = CONTENT_BUDGET) -> int:
    """Largest w <= window such that P0 plus every circular run of w frames fits the budget (0 if none fits);
    budget None: no token limit (T5 and the LLM encoders take any length)."""
    n = len(frame_lens)
    best = 0
    for w in range(1, min(window, n) + 1):
        longest = max(sum(frame_lens[(j + i) % n] for i in range(w)) for j in range(n))
        if budget is not None and identity_len + longest > budget:
            break
        best = w
    return best


def consolidate(identity_len: int, frame_lens: list[int], window: int = 10,
                budget: int | None = CONTENT_BUDGET) -> list[FramePrompt]:
    """Prompt consolidation (Sec. 3.1, reference code): all frames in story order when they fit, else for frame j
    the circular window of w frames starting at j; w = window shrunk until every prompt fits, counted in tokens."""
    if not frame_lens:
        raise ValueError("no frame prompts")
    n = len(frame_lens)
    w = max_window(identity_len, frame_lens, window, budget)
    if w == 0:
        worst = max(range(n), key=lambda j: frame_lens[j])
        raise StoryTooLong(worst, identity_len + frame_lens[worst] - budget)
    if w >= n:
        return [FramePrompt(tuple(range(n)), j) for j in range(n)]
    return [FramePrompt(tuple((j + i) % n for i in range(w)), j) for j in range(n)]


def consolidate_encoders(lengths: dict[str, tuple[int, list[int]]], budgets: dict[str, int | None],
                         window: int = 10) -> list[FramePrompt]:
    """Consolidation when several tokenizers read the same text (SD3.5: CLIP-L/G and T5; FLUX.1: T5 for the
    sequence): one plan whose every prompt fits every tokenizer's budget. lengths: key -> (P0 tokens, frame tokens).
    Raises StoryTooLong of the tokenizer that overflows, with `.key` set."""
    w = min(window, len(next(iter(lengths.values()))[1]))
    for key, (n0, lens) in lengths.items():
        fit = max_window(n0, lens, window, budgets.get(key))
        if fit == 0:
            worst = max(range(len(lens)), key=lambda j: lens[j])
            error = StoryTooLong(worst, n0 + lens[worst] - budgets[key])
            error.key = key
            raise error
        w = min(w, fit)
    key = next(iter(lengths))
    return consolidate(lengths[key][0], lengths[key][1], w, None)


def token_sets(identity_len: int, frame_lens: list[int], prompt: FramePrompt,
               length: int = CONTEXT_LENGTH, prefix: int = 1) -> TokenSets:
    """Token bookkeeping by construction: `prefix` positions (CLIP's start token, an LLM's template head), P0,
    then the frames in order; everything from the end of the last frame on is EOT (end token, template tail,
    padding)."""
    rows: dict[int, tuple[int, ...]] = {}
    pos = prefix + identity_len
    for f in prompt.order:
        rows[f] = tuple(range(pos, pos + frame_lens[f]))
        pos += frame_lens[f]
    if pos >= length:
        raise ValueError(f"consolidated prompt has {pos + 1} positions, more than {length}")
    return TokenSets(identity=tuple(range(prefix + identity_len)), express=rows[prompt.express],
                     suppress=tuple(rows[f] for f in prompt.order if f != prompt.express),
                     eot=tuple(range(pos, length)))


def singular_value_reweight(embeds: torch.Tensor, rows, alpha: float, beta: float, sign: float) -> torch.Tensor:
    """SVR, Eq. (4)-(5): E[I]^T = U S V^T (float64), S' = beta * S * exp(sign * alpha * S), E[I] = (U S' V^T)^T.

    embeds: [T, D]. Returns a new tensor; rows outside `rows` are the input's bits."""
    index = torch.tensor(sorted(set(rows)), dtype=torch.long, device=embeds.device)
    out = embeds.clone()
    if index.numel() == 0:
        return out
    m = embeds.index_select(0, index).to(torch.float64).T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s = beta * s * torch.exp(sign * alpha * s)
    out[index] = ((u * s) @ vh).T.to(embeds.dtype)
    return out


@dataclass(frozen=True)
class SVRConstants:
    """The reference code's constants: suppress (a=0.01, b=0.05, sign -1) first, then express (a=0.01, b=1.0, +1)."""
    express_alpha: float = 0.01
    express_beta: float = 1.0
    suppress_alpha: float = 0.01
    suppress_beta: float = 0.05


def svr(embeds: torch.Tensor, sets: TokenSets, k: SVRConstants = SVRConstants()) -> torch.Tensor:
    """SVR in the code's order: weaken each suppress set (with EOT), then strengthen the express set (with EOT)."""
    out = embeds
    for rows in sets.suppress:
        out = singular_value_reweight(out, rows + sets.eot, k.suppress_alpha, k.suppress_beta, -1.0)
    return singular_value_reweight(out, sets.express + sets.eot, k.express_alpha, k.express_beta, +1.0)


def naive_prompt_reweight(embeds: torch.Tensor, sets: TokenSets, up: float = 2.0, down: float = 0.5) -> torch.Tensor:
    """NPR, the paper's baseline: express-token embeddings x2, the other frames' token embeddings x0.5."""
    out = embeds.clone()
    out[list(sets.express)] = embeds[list(sets.express)] * up
    others = sorted({r for rows in sets.suppress for r in rows})
    if others:
        out[others] = embeds[others] * down
    return out


def shift_sets(sets: TokenSets, offset: int) -> TokenSets:
    """The same sets moved by `offset` rows (the host drops an LLM's template head, SD3.5 stacks T5 after CLIP);
    rows that fall before the output's first row are dropped."""
    def move(rows):
        return tuple(r + offset for r in rows if r + offset >= 0)
    return TokenSets(move(sets.identity), move(sets.express), tuple(move(r) for r in sets.suppress), move(sets.eot))


def reweight_parts(embeds: torch.Tensor, parts: list[int], fn) -> torch.Tensor:
    """Apply fn([T, d]) to each encoder's channel slice separately (SDXL: CLIP-L 768 then CLIP-G 1280)."""
    if sum(parts) != embeds.shape[-1]:
        raise ValueError(f"channel parts {parts} do not add up to {embeds.shape[-1]}")
    return torch.cat([fn(chunk) for chunk in torch.split(embeds, parts, dim=-1)], dim=-1)


def identity_columns(length: int, identity_count: int, period: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Bool [length]: the start-token and P0 columns, in every copy when the host repeats a context to a longer one."""
    return (torch.arange(length) % period) < identity_count


def ipca_bias(columns: torch.Tensor, keep: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """IPCA as an additive logit bias (Sec. 3.3 + causal encoder): ln 2 on the identity columns, 0 elsewhere.

    columns: bool [T]. keep: optional bool [..., T] (identity-column dropout; a dropped copy adds nothing)."""
    bias = columns.to(dtype) * IPCA_BIAS
    if keep is not None:
        bias = bias * keep.to(dtype)
    return bias


def dropout_keep(shape, p: float, columns: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Identity-column dropout of the reference code: each (query, identity column) copy kept with probability 1-p."""
    keep = torch.rand(shape, generator=generator) >= p
    return keep | ~columns


def ipca_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity: torch.Tensor, attend,
                         extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                         axis: int = 1) -> torch.Tensor:
    """IPCA on a DiT's joint attention for image-token queries q over keys/values k, v (token axis `axis`: 1 for
    [B, L, C], 2 for heads-first [B, heads, L, D]).

    Bias path (extra_k None): the identity text columns (`identity`, long [n]) are attended a second time, by
    appending their keys/values once more: exp(s + ln 2) = 2 exp(s), so this is softmax(QK^T/sqrt(d) + ln 2 on
    those columns) exactly, computed by the host's own (mask-free, memory-efficient) attention.
    Exact path: extra_k/extra_v (n tokens on `axis`) are the keys/values of the identity prompt alone, appended."""
    if extra_k is None:
        index = identity.to(k.device)
        extra_k, extra_v = k.index_select(axis, index), v.index_select(axis, index)
    return attend(q, torch.cat([k, extra_k.to(k)], dim=axis), torch.cat([v, extra_v.to(v)], dim=axis))


def ipca_bias_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, columns) -> torch.Tensor:
    """The ln 2 logit bias written out (float64, for tests): softmax(QK^T/sqrt(d) + b) V per head, [B, N, C]."""
    b, n, c = q.shape
    d = c // heads

    def split(t):
        return t.double().view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    bias = torch.zeros(k.shape[1], dtype=torch.float64)
    bias[list(columns)] = IPCA_BIAS
    out = torch.softmax(logits + bias, dim=-1) @ split(v)
    return out.transpose(1, 2).reshape(b, n, c)
