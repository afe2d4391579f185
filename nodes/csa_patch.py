"""Consistent Self-Attention inside the host's UNet: the attn1 hooks, the per-run state and the reference bank's life.

One `ConsistentSelfAttention` object per patched MODEL holds everything: the settings, the layers it changes, the
story plan of the batch being sampled (set by the story sampler) and the bank. It is registered as
- an attn1 patch (`capture`): sees the normed hidden states of every layer and writes reference frames' sampled
  tokens to the bank;
- the attn1 replace of each selected layer (`__call__`): gets q, k, v projected once per frame and attends each
  frame over its own tokens plus the sampled tokens of the other frames of the same CFG half (and the bank).
Clones of the patched MODEL share the object (`__deepcopy__`), two CSA nodes make two objects.
"""
from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..kernels import consistent_attention as csa

log = logging.getLogger("storykit")

ATTACHMENT = "storykit_csa"
LAYER_SETS = {
    "decoder": ("output",),
    "decoder+middle": ("output", "middle"),
    "all": ("input", "middle", "output"),
}
_BLOCK_PATH = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.\d+\.transformer_blocks\.(\d+)$")
_MIDDLE_PATH = re.compile(r"^middle_block\.\d+\.transformer_blocks\.(\d+)$")
EVERYONE = frozenset({"*"})


@dataclass(frozen=True)
class StoryFrame:
    """One row of a CFG half: which story frame it is, who is in it, and whether it is a reference."""
    frame: int
    characters: frozenset
    reference: bool


def self_attention_layers(diffusion_model) -> dict[tuple, torch.nn.Module]:
    """attn1 modules of a UNet built from the host's transformer blocks, keyed like transformer_options:
    (\"input\"|\"middle\"|\"output\", block number, index in the block)."""
    found = {}
    for name, module in diffusion_model.named_modules():
        if not hasattr(module, "attn1") or not hasattr(module, "norm1"):
            continue
        if match := _BLOCK_PATH.match(name):
            key = (match.group(1).split("_")[0], int(match.group(2)), int(match.group(3)))
        elif match := _MIDDLE_PATH.match(name):
            key = ("middle", 0, int(match.group(1)))
        else:
            continue
        found[key] = module.attn1
    return found


def parse_rates(text: str, default: float) -> list[float]:
    """'0.5' or '0.6, 0.5, 0.4' (finest level first) -> per-level sampling rates; '' -> [default]."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        rates = [float(p) for p in parts] or [default]
    except ValueError:
        raise ValueError(f"StoryKit Consistent Self-Attention: rate_per_level {text!r} is not a list of numbers; "
                         "write e.g. '0.5, 0.5, 0.7' (finest resolution first) or leave it empty") from None
    bad = [r for r in rates if not 0.0 <= r <= 1.0]
    if bad:
        name = "rate_per_level" if parts else "sampling_rate"
        raise ValueError(f"StoryKit Consistent Self-Attention: {name} has {bad[0]}; rates are fractions "
                         "of tokens between 0.0 and 1.0")
    return rates


class ConsistentSelfAttention:
    def __init__(self, layers: dict[tuple, torch.nn.Module], rates: list[float], sigma_start: float,
                 sigma_end: float, skip_probability: float = 0.0, seed: int = 0, window: int = 0,
                 bank_dtype: torch.dtype | None = torch.float16, bank_storage: str = "cpu"):
        self.layers = layers
        self.rates, self.sigma_start, self.sigma_end = rates, sigma_start, sigma_end
        self.skip_probability, self.seed, self.window = skip_probability, seed, window
        self.bank = csa.ReferenceBank(dtype=bank_dtype, storage=bank_storage)
        self.bank_characters: dict[int, frozenset] = {}
        self.plan: list[StoryFrame] | None = None
        self.holds = 0
        self._samples: dict[tuple, torch.Tensor] = {}
        self._samples_sigma: float | None = None

    def __deepcopy__(self, memo):
        return self  # clones of one patched MODEL share the run state; model_options are deep-copied on clone

    # ------------------------------------------------------------------ lifetime
    @contextmanager
    def story_run(self):
        """Keep the bank across several sampler runs (references, then readers); release it at the end."""
        self.holds += 1
        try:
            yield self
        finally:
            self.holds -= 1
            self.plan = None
            if not self.holds:
                self.release()

    def on_cleanup(self, patcher=None) -> None:
        if not self.holds:
            self.release()

    def release(self) -> None:
        self.bank.clear()
        self.bank_characters.clear()
        self._samples.clear()

    # ------------------------------------------------------------------ per call
    def _layer(self, extra: dict) -> tuple | None:
        block = extra.get("block")
        if block is None:
            return None
        key = (block[0], block[1], extra.get("block_index", 0))
        return key if key in self.layers else None

    def _sigma(self, extra: dict, key: tuple) -> float | None:
        """The step's sigma when consistency is on for this layer call, else None."""
        sigmas = extra.get("sigmas")
        if sigmas is None:
            return None
        sigma = float(sigmas.flatten()[0])
        if not self.sigma_end <= sigma <= self.sigma_start:
            return None
        if self.skip_probability > 0 and \
                csa.uniform(csa.stable_seed(self.seed, "skip", sigma, key)) < self.skip_probability:
            return None
        return sigma

    def _rate(self, n_tokens: int, extra: dict) -> float:
        shape = extra.get("original_shape")
        level = 0
        if shape is not None and n_tokens:
            level = max(0, round(math.log(max(shape[-1] * shape[-2] / n_tokens, 1.0), 4)))
        return self.rates[min(level, len(self.rates) - 1)]

    def _frames(self, rows: int) -> list[StoryFrame]:
        if self.plan is not None:
            if len(self.plan) != rows:
                raise ValueError(f"StoryKit Consistent Self-Attention: the story plan has {len(self.plan)} frames "
                                 f"but the batch has {rows}; sample the story with the StoryKit Story Sampler")
            return self.plan
        return [StoryFrame(i, EVERYONE, True) for i in range(rows)]

    def _sample(self, frame: int, n_tokens: int, rate: float, sigma: float) -> torch.Tensor:
        """S_frame at this step and resolution: the same for every layer of that resolution, reader and writer."""
        if sigma != self._samples_sigma:
            self._samples.clear()
            self._samples_sigma = sigma
        key = (frame, n_tokens, rate)
        if key not in self._samples:
            self._samples[key] = csa.sample_tokens(n_tokens, rate, csa.stable_seed(self.seed, frame, n_tokens, sigma))
        return self._samples[key]

    @staticmethod
    def _halves(extra: dict, rows: int) -> list[tuple[int, slice]]:
        halves = extra.get("cond_or_uncond") or [0]
        b = rows // len(halves)
        return [(half, slice(i * b, (i + 1) * b)) for i, half in enumerate(halves)]

    def capture(self, n, context, value, extra):
        """attn1 patch: reference frames write S_j of this layer and step to the bank (story runs only)."""
        if self.plan is None or not any(f.reference for f in self.plan):
            return n, context, value
        key = self._layer(extra)
        sigma = self._sigma(extra, key) if key else None
        if sigma is None:
            return n, context, value
        rate = self._rate(n.shape[1], extra)
        for half, rows in self._halves(extra, n.shape[0]):
            part = n[rows]
            for row, frame in enumerate(self._frames(part.shape[0])):
                if frame.reference and frame.characters:
                    index = self._sample(frame.frame, n.shape[1], rate, sigma).to(part.device)
                    self.bank.write(key, half, sigma, frame.frame, part[row, index])
                    self.bank_characters[frame.frame] = frame.characters
        return n, context, value

    def __call__(self, q, k, v, extra):
        """attn1 replace: consistent self-attention over each CFG half separately (uncond never sees cond)."""
        import comfy.ldm.modules.attention as host_attention
        heads = extra["n_heads"]

        def attend(q_, k_, v_):
            return host_attention.optimized_attention(q_, k_, v_, heads, attn_precision=extra.get("attn_precision"))

        key = self._layer(extra)
        sigma = self._sigma(extra, key) if key else None
        if sigma is None:
            return attend(q, k, v)
        rate = self._rate(q.shape[1], extra)
        halves = self._halves(extra, q.shape[0])
        frames = self._frames(halves[0][1].stop - halves[0][1].start)
        if not self.window or len(frames) <= self.window:  # both halves in one batched call
            return self._attend(q, k, v, [(half, frames) for half, _ in halves], key, sigma, rate, attend)
        out = torch.empty_like(q)
        for half, rows in halves:
            def run(members: list[int], rows=rows, half=half):
                return self._attend(q[rows][members], k[rows][members], v[rows][members],
                                    [(half, [frames[i] for i in members])], key, sigma, rate, attend)
            out[rows] = csa.windowed(len(frames), self.window, run, q[rows])
        return out

    def _attend(self, q, k, v, parts, key, sigma, rate, attend):
        """parts: (CFG half, its frames) in the order their rows are stacked in q; sources stay inside a half."""
        n_tokens = q.shape[1]
        sources, samples, spans, hidden = [], {}, [], []
        first_row, bank_length = 0, 0
        for half, frames in parts:
            local = [[j for j, other in enumerate(frames) if j != i and other.reference
                      and other.characters & frame.characters] for i, frame in enumerate(frames)]
            sources.extend([first_row + j for j in row] for row in local)
            for j in {j for row in local for j in row}:
                samples[first_row + j] = self._sample(frames[j].frame, n_tokens, rate, sigma)
            in_batch = {f.frame for f in frames}
            wanted = [[f for f in self.bank_characters if f not in in_batch
                       and self.bank_characters[f] & frame.characters] for frame in frames]
            needed = sorted({f for row in wanted for f in row})
            tokens = self.bank.read(key, half, sigma, needed, q.device) if needed else {}
            starts = {}
            for f in needed:
                if f in tokens:
                    starts[f] = (bank_length, tokens[f].shape[0])
                    bank_length += tokens[f].shape[0]
                    hidden.append(tokens[f])
            spans.extend([starts[f] for f in row if f in starts] for row in wanted)
            first_row += len(frames)
        bank_k = bank_v = None
        if hidden:  # the bank holds normed hidden states: project them once for every frame that reads them
            attn1 = self.layers[key]
            states = torch.cat(hidden).to(q.dtype).unsqueeze(0)
            bank_k, bank_v = attn1.to_k(states)[0], attn1.to_v(states)[0]
        return csa.consistent_self_attention(q, k, v, attend, sources, samples, bank_k, bank_v,
                                             spans if hidden else None)


def patch_model(model, rates: list[float], layer_set: str, start_percent: float, end_percent: float,
                skip_probability: float, seed: int, window: int, bank_dtype, bank_storage: str):
    """Clone `model` and install consistent self-attention on the chosen self-attention layers."""
    import comfy.patcher_extension
    if layer_set not in LAYER_SETS:
        raise ValueError(f"StoryKit Consistent Self-Attention: layers {layer_set!r} is not one of "
                         + ", ".join(LAYER_SETS))
    if start_percent > end_percent:
        raise ValueError("StoryKit Consistent Self-Attention: start_percent is after end_percent; "
                         "set start_percent <= end_percent")
    patched = model.clone()
    layers = {key: module for key, module in self_attention_layers(patched.model.diffusion_model).items()
              if key[0] in LAYER_SETS[layer_set]}
    if not layers:
        raise ValueError("StoryKit Consistent Self-Attention: this model has no UNet self-attention layers in "
                         f"'{layer_set}'; it works on SD1.5/SDXL-style UNets (try layers 'all')")
    sampling = patched.get_model_object("model_sampling")
    state = ConsistentSelfAttention(layers, rates, sampling.percent_to_sigma(start_percent),
                                    sampling.percent_to_sigma(end_percent), skip_probability, seed, window,
                                    bank_dtype, bank_storage)
    patched.set_model_attn1_patch(state.capture)
    for block, number, index in layers:
        patched.set_model_attn1_replace(state, block, number, index)
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ATTACHMENT, state.on_cleanup)
    patched.set_attachments(ATTACHMENT, state)
    return patched


def state_of(model) -> ConsistentSelfAttention | None:
    return model.get_attachment(ATTACHMENT) if hasattr(model, "get_attachment") else None
