"""Consistent Self-Attention as a technique on attention sites: the per-run state and the reference bank's life.

One `ConsistentSelfAttention` object per patched MODEL holds everything: the settings, the story plan of the batch
being sampled (set by the story sampler) and the bank. It never sees the model family: an attention site
(nodes/attention_sites.py: UNet attn1, DiT joint attention) hands it a SiteCall and q, k, v, and it
- `capture`s reference frames' sampled tokens into the bank (UNet: normed hidden states from the attn1 patch;
  DiT: keys and values, written from `attend`);
- `attend`s each frame's image-token queries over its own keys plus the sampled image tokens of the other frames of
  the same CFG half (and the bank).
Clones of the patched MODEL share the object (`__deepcopy__`), two CSA nodes make two objects.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..kernels import consistent_attention as csa
from ..kernels import identity_routing as ident
from . import attention_sites as sites
from . import routing

log = logging.getLogger("storykit")

NODE = "StoryKit Consistent Self-Attention"
ATTACHMENT = "storykit_csa"
LAYER_SETS = sites.UNET_LAYER_SETS
EVERYONE = frozenset({"*"})
# Gathered keys/values (and the logits a non-fused host attention makes) of one attention call stay within 64 MB,
# or one frame's where that is more: frames are then attended a few (DiTs and SDXL at 1024 px: one) at a time, so
# memory does not grow with the square of the batch, and the peak is near the reference's frame-by-frame loop.
DEFAULT_BUDGET = 64 << 20


@dataclass(frozen=True)
class StoryFrame:
    """One row of a CFG half: which story frame it is, who is in it, and whether it is a reference."""
    frame: int
    characters: frozenset
    reference: bool


def parse_rates(text: str, default: float) -> list[float]:
    """'0.5' or '0.6, 0.5, 0.4' (finest level first) -> per-level sampling rates; '' -> [default]."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        rates = [float(p) for p in parts] or [default]
    except ValueError:
        raise ValueError(f"{NODE}: rate_per_level {text!r} is not a list of numbers; "
                         "write e.g. '0.5, 0.5, 0.7' (finest resolution first) or leave it empty") from None
    bad = [r for r in rates if not 0.0 <= r <= 1.0]
    if bad:
        name = "rate_per_level" if parts else "sampling_rate"
        raise ValueError(f"{NODE}: {name} has {bad[0]}; rates are fractions of tokens between 0.0 and 1.0")
    return rates


class ConsistentSelfAttention:
    def __init__(self, rates: list[float], sigma_start: float, sigma_end: float, skip_probability: float = 0.0,
                 seed: int = 0, window: int = 0, bank_dtype: torch.dtype | None = torch.float16,
                 bank_storage: str = "cpu", attention_budget: int | None = None):
        self.rates, self.sigma_start, self.sigma_end = rates, sigma_start, sigma_end
        self.skip_probability, self.seed, self.window = skip_probability, seed, window
        self.attention_budget = attention_budget  # bytes of gathered keys/values per call; None: the default
        self.bank = csa.ReferenceBank(dtype=bank_dtype, storage=bank_storage)
        self.bank_characters: dict[int, frozenset] = {}
        self.bank_enabled = True  # False: the story sampler re-runs the references beside each reader batch
        self.plan: list[StoryFrame] | None = None
        self.routing = None  # kernels.identity_routing.Routing of the story run (bounded sharing), or None
        self.photo_inputs: dict = {}  # row of the batch -> (photo latent in model space, its fixed noise)
        self.model_sampling = None
        self.site = None
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
        self.routing = None  # nothing of one story's masks or photos survives into the next
        self.photo_inputs = {}
        self.bank.clear()
        self.bank_characters.clear()
        self._samples.clear()

    # ------------------------------------------------------------------ per call
    def writing(self) -> bool:
        return self.plan is not None and any(f.reference for f in self.plan)

    def _sigma(self, call: sites.SiteCall) -> float | None:
        """The step's sigma when consistency is on for this call, else None."""
        sigma = call.sigma
        if sigma is None or not self.sigma_end <= sigma <= self.sigma_start:
            return None
        if self.skip_probability > 0 and \
                csa.uniform(csa.stable_seed(self.seed, "skip", sigma, call.block)) < self.skip_probability:
            return None
        return sigma

    def active(self, call: sites.SiteCall) -> bool:
        """Whether this call shares anything (decided before the site copies a tensor: off stays bit for bit)."""
        return self._sigma(call) is not None and (self._rate(call) > 0 or bool(self.bank_characters))

    def _rate(self, call: sites.SiteCall) -> float:
        return self.rates[min(call.level, len(self.rates) - 1)]

    def _frames(self, rows: int) -> list[StoryFrame]:
        if self.plan is not None:
            if len(self.plan) != rows:
                raise ValueError(f"{NODE}: the story plan has {len(self.plan)} frames but the batch has {rows}; "
                                 "sample the story with the StoryKit Story Sampler")
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

    def capture(self, call: sites.SiteCall, take) -> None:
        """Reference frames write S_j of this block and step to the bank (story runs only).
        take(row, token indices) gives a row's tokens to store; call.image is the span that gets sampled."""
        sigma = self._sigma(call)
        if sigma is None or not self.writing() or not self.bank_enabled:
            return
        rate = self._rate(call)
        n_image = call.image.stop - call.image.start
        routing = self._routing(call, sigma)
        for half, rows in call.halves:
            for row, frame in enumerate(self._frames(rows.stop - rows.start)):
                if frame.reference and frame.characters:
                    sample = self._sample(frame.frame, n_image, rate, sigma)
                    labels = routing.labels(frame.frame, call.grid)[sample] if routing is not None else None
                    self.bank.write(call.block, half, sigma, frame.frame, take(rows.start + row,
                                                                               sample + call.image.start), labels)
                    self.bank_characters[frame.frame] = frame.characters

    def _routing(self, call: sites.SiteCall, sigma: float):
        """The story's routing when sharing is bounded in this call (it needs the call's token grid), else None."""
        routing = self.routing
        if routing is None or call.grid is None or not routing.bounded():
            return None
        routing.at_sigma(sigma)
        return routing

    # ------------------------------------------------------------------ automatic masks (identity routing)
    def wanted_maps(self, call: sites.SiteCall) -> list[tuple[int, int, list[tuple[int, torch.Tensor]]]]:
        """(row, story frame, [(character id, its description's text positions)]) of the COND rows whose frames
        take automatic masks from this call; [] when none do (sharing off, unbounded, no token grid, or the
        masks have settled)."""
        sigma = self._sigma(call)
        routing = self._routing(call, sigma) if sigma is not None else None
        if routing is None:
            return []
        wanted = []
        for half, rows in call.halves:
            if half != 0:  # the cond half only: the uncond rows' attention says nothing about the description
                continue
            for i, frame in enumerate(self._frames(rows.stop - rows.start)):
                columns = []
                for character in routing.wants_maps(frame.frame):
                    tokens = routing.frames[frame.frame].tokens.get(character)
                    if tokens is None or not tokens.numel():
                        routing.no_mask(frame.frame, character, "its description has no tokens in the prompt")
                    else:
                        columns.append((character, tokens + call.text_offset))
                if columns:
                    wanted.append((rows.start + i, frame.frame, columns))
        return wanted

    def observe(self, call: sites.SiteCall, q_image, k_text) -> None:
        """Text-to-image attention maps of the characters' description tokens, for the routing's automatic
        masks. q_image: the call's image-token queries, k_text: its text keys (the conditioning's rows after
        call.text_offset), both in the call's layout (heads-first [rows, H, ., D] when call.heads)."""
        wanted = self.wanted_maps(call)
        if not wanted:
            return
        with torch.no_grad():
            for row, frame, columns in wanted:
                keys = k_text[min(row, k_text.shape[0] - 1)]  # a context of batch 1 serves every row
                maps = ident.text_attention_maps(q_image[row], keys, [t for _, t in columns],
                                                 heads_first=bool(call.heads), n_heads=call.n_heads)
                for (character, _), map_ in zip(columns, maps, strict=True):
                    self.routing.add_map(frame, character, map_.view(call.grid))

    def attend(self, call: sites.SiteCall, q, k, v, attend):
        """Consistent self-attention over each CFG half separately (uncond never sees cond); None when off.
        q: [rows, Nq, C] image-token queries, k, v: [rows, L, C] every token of each row; heads-first
        ([rows, heads, ., D]) when call.heads."""
        sigma = self._sigma(call)
        if sigma is None:
            return None
        if call.take is not None and self.writing():
            self.capture(call, call.take)
        rate = self._rate(call)
        frames = self._frames(call.halves[0][1].stop - call.halves[0][1].start)
        if not self.window or len(frames) <= self.window:  # both halves in one batched call
            return self._attend(q, k, v, [(half, frames) for half, _ in call.halves], call, sigma, rate, attend)
        out = torch.empty_like(q)
        for half, rows in call.halves:
            def run(members: list[int], rows=rows, half=half):
                return self._attend(q[rows][members], k[rows][members], v[rows][members],
                                    [(half, [frames[i] for i in members])], call, sigma, rate, attend)
            out[rows] = csa.windowed(len(frames), self.window, run, q[rows])
        return out

    def _attend(self, q, k, v, parts, call, sigma, rate, attend):
        """parts: (CFG half, its frames) in the order their rows are stacked in q; sources stay inside a half."""
        n_image = call.image.stop - call.image.start
        routing = self._routing(call, sigma)
        sources, samples, spans, hidden, hidden_labels = [], {}, [], [], []
        first_row, bank_length = 0, 0
        for half, frames in parts:
            local = [[j for j, other in enumerate(frames) if j != i and other.reference
                      and other.characters & frame.characters] for i, frame in enumerate(frames)]
            sources.extend([first_row + j for j in row] for row in local)
            for j in {j for row in local for j in row}:
                samples[first_row + j] = self._sample(frames[j].frame, n_image, rate, sigma) + call.image.start
            in_batch = {f.frame for f in frames}
            wanted = [[f for f in self.bank_characters if f not in in_batch
                       and self.bank_characters[f] & frame.characters] for frame in frames]
            needed = sorted({f for row in wanted for f in row})
            tokens = self.bank.read(call.block, half, sigma, needed, q.device) if needed else {}
            labels = self.bank.read_labels(call.block, half, sigma, needed) if needed and routing else {}
            starts = {}
            for f in needed:
                if f in tokens:
                    starts[f] = (bank_length, tokens[f].shape[0])
                    bank_length += tokens[f].shape[0]
                    hidden.append(tokens[f])
                    if routing is not None:  # a token written without labels is no one's: never shared
                        hidden_labels.append(labels.get(f, torch.full((tokens[f].shape[0],), ident.UNKNOWN)))
            spans.extend([starts[f] for f in row if f in starts] for row in wanted)
            first_row += len(frames)
        if not hidden and not any(sources):
            return None  # nothing to share (rate 0, no references in reach): the host's own attention, bit for bit
        bank_k = bank_v = None
        if hidden:  # project (UNet) or split (DiT) the stored tokens once for every frame that reads them
            bank_k, bank_v = call.to_kv(torch.cat(hidden).to(q.dtype))
        if routing is not None:  # bounded sharing: queries and shared tokens labelled by character
            query_labels = [routing.labels(f.frame, call.grid) for _, frames in parts for f in frames]
            sample_labels = {j: query_labels[j][index - call.image.start] for j, index in samples.items()}
            return csa.routed_attention(q, k, v, attend, sources, samples, sample_labels, query_labels, bank_k,
                                        bank_v, spans if hidden else None,
                                        torch.cat(hidden_labels) if hidden else None, routing.share_background,
                                        heads_first=bool(call.heads))
        budget = self.attention_budget if self.attention_budget is not None else DEFAULT_BUDGET
        if call.heads:
            return csa.consistent_joint_attention(q, k, v, attend, sources, samples, bank_k, bank_v,
                                                  spans if hidden else None, budget_bytes=budget)
        return csa.consistent_self_attention(q, k, v, attend, sources, samples, bank_k, bank_v,
                                             spans if hidden else None, budget_bytes=budget, heads=call.n_heads)


def model_site(model, layer_set: str = "decoder", blocks: str = "", node: str = NODE):
    """The attention site of a MODEL with its selected blocks, or a clear error naming the supported families."""
    base = model.model
    diffusion_model = base.diffusion_model
    family = sites.family_of(base)
    if family is not None:
        available = sites.JointAttention.available(family, diffusion_model)
        chosen = sites.parse_blocks(blocks, available, node) if blocks.strip() else \
            sites.JointAttention.default_blocks(family, diffusion_model)
        return sites.JointAttention(family, diffusion_model, chosen)
    layers = sites.UNetSelfAttention.blocks_of(diffusion_model)
    if not layers:
        raise ValueError(f"{node}: {type(base).__name__} is not a model StoryKit can patch; supported: "
                         f"{sites.SUPPORTED}")
    if blocks.strip():
        available = {kind: max(n for k, n, _ in layers if k == kind) + 1 for kind in {k for k, _, _ in layers}}
        chosen = sites.parse_blocks(blocks, available, node)
        layers = {key: module for key, module in layers.items() if key[:2] in chosen}
    else:
        if layer_set not in LAYER_SETS:
            raise ValueError(f"{node}: layers {layer_set!r} is not one of " + ", ".join(LAYER_SETS))
        layers = {key: module for key, module in layers.items() if key[0] in LAYER_SETS[layer_set]}
    if not layers:
        raise ValueError(f"{node}: this UNet has no self-attention layers in '{blocks or layer_set}' "
                         "(try layers 'all')")
    return sites.UNetSelfAttention(layers, max(1, len(getattr(diffusion_model, "output_blocks", ())) // 3))


def patch_model(model, rates: list[float], layer_set: str, start_percent: float, end_percent: float,
                skip_probability: float, seed: int, window: int, bank_dtype, bank_storage: str, blocks: str = ""):
    """Clone `model` and install consistent self-attention on the chosen blocks of its attention site."""
    import comfy.patcher_extension
    if start_percent > end_percent:
        raise ValueError(f"{NODE}: start_percent is after end_percent; set start_percent <= end_percent")
    site = model_site(model, layer_set, blocks)  # raises before anything is cloned or patched
    patched = model.clone()
    sampling = patched.get_model_object("model_sampling")
    state = ConsistentSelfAttention(rates, sampling.percent_to_sigma(start_percent),
                                    sampling.percent_to_sigma(end_percent), skip_probability, seed, window,
                                    bank_dtype, bank_storage)
    state.site = site
    state.model_sampling = sampling
    site.install(patched, state)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, routing.WRAPPER_KEY,
                                 functools.partial(routing.photo_wrapper, state))
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ATTACHMENT, state.on_cleanup)
    patched.set_attachments(ATTACHMENT, state)
    return patched


def state_of(model) -> ConsistentSelfAttention | None:
    return model.get_attachment(ATTACHMENT) if hasattr(model, "get_attachment") else None


self_attention_layers = sites.unet_self_attention_layers
