"""Attention sites: where a technique meets a self-attention over image tokens inside the host's model.

A site turns one attention call of the host into a `SiteCall`: which block it is (the id used for block selection
and bank keys), which rows are which CFG half, where the image tokens sit on the token axis (a DiT's joint sequence
also holds the frame's text tokens), and how stored bank tokens become keys and values. Techniques (Consistent
Self-Attention today) are written once against SiteCall and never see the model family.

- `UNetSelfAttention`: UNet attn1 through the host's attn1 patch (sees normed hidden states: the bank stores those)
  and attn1 replace (sees q, k, v) of each selected layer.
- `JointAttention`: DiT joint attention through transformer_options["optimized_attention_override"], installed per
  model call by an APPLY_MODEL wrapper on a copy of the call's options and chained with any override already there.
  Families that pass no block id get it from forward pre-hooks on their block lists, live only inside the wrapper.
  The bank stores keys and values (after RoPE: shared keys keep their own frame's positions).
A new family is an entry of FAMILIES plus its tests.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WRAPPER_KEY = "storykit_attention_site"
MAPS_WRAPPER_KEY = "storykit_text_maps"
log = logging.getLogger("storykit")


@dataclass
class SiteCall:
    block: tuple                      # ("output", 3, 0) on a UNet; ("double", 7), ("single", 12), ("joint", 5) on DiTs
    halves: list                      # [(0 cond | 1 uncond, slice of rows)], in the order the rows are stacked
    image: slice                      # image-token positions on the key axis (the tokens other frames may share)
    sigma: float | None               # this step's sigma
    level: int = 0                    # resolution level, finest 0 (UNet); DiTs have one
    to_kv: Callable | None = None     # stored bank tokens [M, C'] -> keys, values in the call's layout
    take: Callable | None = None      # (row, token indices) -> [n, C'] tokens to store; None: captured elsewhere
    heads: int = 0                    # > 0: q, k, v are heads-first [rows, heads, L, D]; 0: [rows, L, C]
    n_heads: int = 0                  # attention heads (for the memory bound of a token-major call)
    grid: tuple | None = None         # (h, w) of the image tokens (row-major), for masks and layouts
    text: slice | None = None         # text-token positions on the key axis (DiT joint attention), else None
    text_offset: int = 0              # where the conditioning's first row sits in the text (SD3.5's register)


def halves_of(options: dict, rows: int) -> list[tuple[int, slice]]:
    """Rows of each CFG half: the host stacks chunks in the order of cond_or_uncond (never assume one)."""
    halves = options.get("cond_or_uncond") or [0]
    b = rows // len(halves)
    return [(half, slice(i * b, (i + 1) * b)) for i, half in enumerate(halves)]


def sigma_of(options: dict) -> float | None:
    sigmas = options.get("sigmas")
    return None if sigmas is None else float(sigmas.flatten()[0])


# ---------------------------------------------------------------------------------------------- block selection
_RANGE = re.compile(r"^\s*([a-z_]+)\s+(\d+)(?:\s*-\s*(\d+))?\s*$")


def parse_blocks(text: str, available: dict[str, int], node: str) -> set[tuple[str, int]]:
    """'double 10-18, single 0-37' -> {("double", 10), ...}; `available` names each kind's block count."""
    valid = ", ".join(f"{kind} 0-{count - 1}" for kind, count in available.items())
    chosen = set()
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        match = _RANGE.match(part.lower())
        if not match:
            raise ValueError(f"{node}: blocks {part!r} is not 'KIND FIRST-LAST'; this model has {valid}")
        kind, first = match.group(1), int(match.group(2))
        last = int(match.group(3)) if match.group(3) is not None else first
        if kind not in available:
            raise ValueError(f"{node}: blocks {part!r}: this model has no {kind!r} blocks; it has {valid}")
        if first > last or last >= available[kind]:
            raise ValueError(f"{node}: blocks {part!r} is outside the model; valid ranges: {valid}")
        chosen.update((kind, i) for i in range(first, last + 1))
    return chosen


def format_blocks(blocks) -> str:
    """The inverse of parse_blocks, for logs: {("double", 10), ..., ("double", 18)} -> 'double 10-18'."""
    parts = []
    for kind in sorted({k for k, _ in blocks}):
        numbers = sorted(i for k, i in blocks if k == kind)
        start = prev = numbers[0]
        for n in numbers[1:] + [None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            parts.append(f"{kind} {start}" + (f"-{prev}" if prev != start else ""))
            if n is not None:
                start = prev = n
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- UNet attn1
_BLOCK_PATH = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.\d+\.transformer_blocks\.(\d+)$")
_MIDDLE_PATH = re.compile(r"^middle_block\.\d+\.transformer_blocks\.(\d+)$")
UNET_LAYER_SETS = {
    "decoder": ("output",),
    "decoder+middle": ("output", "middle"),
    "all": ("input", "middle", "output"),
}


def unet_transformer_blocks(diffusion_model) -> dict[tuple, torch.nn.Module]:
    """The host's transformer blocks of a UNet, keyed like transformer_options:
    ("input"|"middle"|"output", block number, index in the block)."""
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
        found[key] = module
    return found


def unet_self_attention_layers(diffusion_model) -> dict[tuple, torch.nn.Module]:
    """attn1 modules of a UNet's transformer blocks (see unet_transformer_blocks)."""
    return {key: block.attn1 for key, block in unet_transformer_blocks(diffusion_model).items()}


class UNetSelfAttention:
    """UNet attn1: the patch captures normed hidden states for the bank, the replace attends with q, k, v."""
    family = "unet"

    def __init__(self, layers: dict[tuple, torch.nn.Module], levels: int = 4):
        self.layers = layers
        self.levels = levels      # resolution levels of the UNet (SD1.5 4, SDXL 3)
        self.technique = None
        self.cross: dict[tuple, torch.nn.Module] = {}  # attn2 of the selected blocks (text-to-image maps)
        self._watch: list | None = None  # [attn2, SiteCall, q]: the cross-attention call whose q, k go on

    def __deepcopy__(self, memo):
        return self  # model_options are deep-copied on every clone: the site (and the modules it knows) is shared

    @classmethod
    def blocks_of(cls, diffusion_model) -> dict[tuple, torch.nn.Module]:
        return unet_self_attention_layers(diffusion_model)

    def bank_bytes(self, latent_shape, rate: float, element_size: int) -> int:
        """Bytes per reference frame, CFG half and step: sampled normed hidden states of every selected layer (a
        layer at resolution level l has the latent's H*W / 4^l tokens; level from its input block's depth)."""
        from ..kernels import consistent_attention as csa
        tokens = latent_shape[-1] * latent_shape[-2]
        total = 0
        for (kind, number, _), attn1 in self.layers.items():
            width = attn1.to_k.in_features
            level = _unet_level(kind, number, self.levels)
            total += csa.sample_count(tokens // 4 ** level, rate) * width * element_size
        return total

    def call(self, options: dict, rows: int, n_tokens: int) -> SiteCall | None:
        block = options.get("block")
        if block is None:
            return None
        key = (block[0], block[1], options.get("block_index", 0))
        if key not in self.layers:
            return None
        level, grid = 0, None
        shape = options.get("original_shape")
        if shape is not None and n_tokens:
            level = max(0, round(math.log(max(shape[-1] * shape[-2] / n_tokens, 1.0), 4)))
            grid = token_grid(shape[-2], shape[-1], n_tokens)
        attn1 = self.layers[key]

        def to_kv(states):  # the bank holds normed hidden states: project them once for every reader
            states = states.unsqueeze(0)
            return attn1.to_k(states)[0], attn1.to_v(states)[0]
        return SiteCall(key, halves_of(options, rows), slice(0, n_tokens), sigma_of(options), level, to_kv,
                        n_heads=options.get("n_heads", 0), grid=grid)

    def install(self, patched, technique) -> None:
        self.technique = technique
        patched.set_model_attn1_patch(self.capture)
        for block, number, index in self.layers:
            patched.set_model_attn1_replace(self.replace, block, number, index)
        if getattr(technique, "observe", None) is not None:  # cross-attention maps (identity routing's masks)
            import comfy.patcher_extension
            blocks = unet_transformer_blocks(patched.model.diffusion_model)
            self.cross = {key: blocks[key].attn2 for key in self.layers
                          if key in blocks and getattr(blocks[key], "attn2", None) is not None}
            patched.set_model_attn2_patch(self.observe)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, MAPS_WRAPPER_KEY,
                                         self.apply_model)

    def capture(self, n, context, value, extra):
        """attn1 patch: reference frames' normed hidden states go to the bank."""
        if self.technique.writing():
            call = self.call(extra, n.shape[0], n.shape[1])
            if call is not None:
                self.technique.capture(call, lambda row, index: n[row, index.to(n.device)])
        return n, context, value

    def apply_model(self, executor, *args, **kwargs):
        """Per model call: forward hooks on the selected blocks' attn2 q and k projections, live only inside the
        call, so the technique reads the very q and k the host computes (no second projection)."""
        hooks = []
        for attn2 in self.cross.values():
            hooks.append(attn2.to_q.register_forward_hook(functools.partial(self._projected, attn2, "q")))
            hooks.append(attn2.to_k.register_forward_hook(functools.partial(self._projected, attn2, "k")))
        try:
            return executor(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            self._watch = None

    def observe(self, n, context, value, extra):
        """attn2 patch: names the cross-attention call whose q and k the hooks hand to the technique; the block's
        inputs pass unchanged."""
        call = self.call(extra, n.shape[0], n.shape[1])
        attn2 = self.cross.get(call.block) if call is not None else None
        active = attn2 is not None and context is not None and self.technique.active(call)
        self._watch = [attn2, call, None] if active else None
        return n, context, value

    def _projected(self, attn2, which: str, module, args, output) -> None:
        watch = self._watch
        if watch is None or watch[0] is not attn2:
            return
        if which == "q":
            watch[2] = output
            return
        self._watch = None
        if watch[2] is not None:
            self.technique.observe(watch[1], watch[2], output)

    def replace(self, q, k, v, extra):
        """attn1 replace of a selected layer: q, k, v projected once per frame."""
        import comfy.ldm.modules.attention as host_attention
        heads = extra["n_heads"]

        def attend(q_, k_, v_):
            return host_attention.optimized_attention(q_, k_, v_, heads, attn_precision=extra.get("attn_precision"))
        call = self.call(extra, q.shape[0], q.shape[1])
        out = self.technique.attend(call, q, k, v, attend) if call is not None else None
        return attend(q, k, v) if out is None else out


def token_grid(height: int, width: int, n_tokens: int) -> tuple[int, int] | None:
    """(h, w) of a UNet level's tokens for a latent of height x width: each down block halves a side, rounding up
    (stride-2 convolutions with padding 1); None when no such grid gives n_tokens."""
    h, w = height, width
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == n_tokens else None


def _unet_level(kind: str, number: int, levels: int) -> int:
    """Resolution level (0 = the latent's own) of a UNet block in the host's numbering: 3 blocks per level in the
    input and output lists (the first input block is the stem), the middle block the deepest."""
    if kind == "input":
        return max(0, (number - 1) // 3)
    if kind == "middle":
        return levels - 1
    return max(0, levels - 1 - number // 3)


# ---------------------------------------------------------------------------------------------- DiT joint attention
@dataclass(frozen=True)
class Family:
    """How one DiT family lays out its joint attention.

    blocks: block kind -> attribute of the diffusion model holding that ModuleList.
    block_ids: "options" when the model sets transformer_options block_type/block_index (then `kinds` maps its
    block_type to ours), "hooks" when forward pre-hooks on the block lists tell the block.
    default: per kind, the (first, last) fraction of blocks CSA patches by default (the later, finer part).
    text_attr: the attribute of the diffusion model holding the multiple it pads its text tokens to (Lumina2/Z-Image).
    """
    name: str
    blocks: dict
    block_ids: str
    default: dict
    kinds: dict = field(default_factory=dict)
    text_attr: str | None = None
    register_tokens: str | None = None  # attribute whose length is prepended to the text (SD3's register)


FAMILIES: dict[str, Family] = {
    # FLUX.1, FLUX.2 and Chroma run comfy/ldm/flux (or chroma) double + single stream blocks, [txt ; img]
    "Flux": Family("FLUX", {"double": "double_blocks", "single": "single_blocks"}, "options",
                   {"double": (0.5, 1.0), "single": (0.0, 1.0)}, {"double": "double", "single": "single"}),
    "QwenImage": Family("Qwen-Image", {"double": "transformer_blocks"}, "options", {"double": (0.5, 1.0)},
                        {"double": "double"}),
    "SD3": Family("SD3.5", {"joint": "joint_blocks"}, "hooks", {"joint": (0.5, 1.0)},
                  register_tokens="register"),
    "Lumina2": Family("Lumina 2 / Z-Image", {"joint": "layers", "refiner": "noise_refiner"}, "hooks",
                      {"joint": (0.5, 1.0)}, text_attr="pad_tokens_multiple"),
}
SUPPORTED = "SD1.5/SDXL UNets, FLUX.1, FLUX.2, Chroma, Qwen-Image, SD3.5, Z-Image (Lumina 2)"


def family_of(model_base) -> Family | None:
    for cls in type(model_base).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


class JointAttention:
    """DiT joint attention over [text ; image (; reference latents)] through the attention override."""

    def __init__(self, family: Family, diffusion_model, blocks: set[tuple[str, int]]):
        self.family, self.diffusion_model, self.blocks = family, diffusion_model, blocks
        self.patch = _patch_size(diffusion_model)
        self.warned_mask = False

    def __deepcopy__(self, memo):
        return self  # as UNetSelfAttention: never copy the diffusion model with model_options

    @classmethod
    def available(cls, family: Family, diffusion_model) -> dict[str, int]:
        return {kind: len(getattr(diffusion_model, attr)) for kind, attr in family.blocks.items()
                if getattr(diffusion_model, attr, None) is not None and len(getattr(diffusion_model, attr))}

    @classmethod
    def default_blocks(cls, family: Family, diffusion_model) -> set[tuple[str, int]]:
        chosen = set()
        for kind, count in cls.available(family, diffusion_model).items():
            first, last = family.default.get(kind, (1.0, 1.0))
            chosen.update((kind, i) for i in range(int(math.floor(first * count)), int(math.ceil(last * count))))
        return chosen

    def bank_bytes(self, latent_shape, rate: float, element_size: int) -> int:
        """Bytes the bank takes per reference frame, CFG half and step: sampled keys + values of every selected
        block (the latent's image tokens at this patch size; the width is the model's hidden size)."""
        from ..kernels import consistent_attention as csa
        width = next((getattr(self.diffusion_model, a) for a in ("hidden_size", "inner_dim", "dim")
                      if isinstance(getattr(self.diffusion_model, a, None), int)), 0)
        n_image = math.prod((side + self.patch - 1) // self.patch for side in latent_shape[-2:])
        return len(self.blocks) * csa.sample_count(n_image, rate) * 2 * width * element_size

    def _text_tokens(self, context: torch.Tensor | None) -> int:
        n = 0 if context is None else context.shape[1]
        multiple = getattr(self.diffusion_model, self.family.text_attr, None) if self.family.text_attr else None
        if multiple:
            n += (-n) % multiple
        return n + self._register_tokens()

    def _register_tokens(self) -> int:
        """Learnt tokens the family puts before the conditioning's rows (SD3.5's register), else 0."""
        register = getattr(self.diffusion_model, self.family.register_tokens, None) \
            if self.family.register_tokens else None
        return register.shape[1] if isinstance(register, torch.Tensor) and register.ndim == 3 else 0

    def install(self, patched, technique) -> None:
        import comfy.patcher_extension
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     functools.partial(self.apply_model, technique))

    def apply_model(self, technique, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):  # noqa: B006 - host signature
        """Per model call: the token layout, the override on a copy of the options, block hooks if needed."""
        grid = tuple((side + self.patch - 1) // self.patch for side in x.shape[-2:])
        layout = (self._text_tokens(c_crossattn), math.prod(grid), grid)
        options = dict(transformer_options)
        options["optimized_attention_override"] = functools.partial(
            self.attention, technique, layout, transformer_options.get("optimized_attention_override"))
        hooks = []
        if self.family.block_ids == "hooks":
            for kind, attr in self.family.blocks.items():
                for i, module in enumerate(getattr(self.diffusion_model, attr, None) or ()):
                    hooks.append(module.register_forward_pre_hook(
                        functools.partial(_enter_block, options, (kind, i))))
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def _block(self, options: dict) -> tuple | None:
        if self.family.block_ids == "hooks":
            return options.get("storykit_block")
        kind = self.family.kinds.get(options.get("block_type"))
        index = options.get("block_index")
        return None if kind is None or index is None else (kind, index)

    def attention(self, technique, layout, previous, func, *args, **kwargs):
        """The override: CSA for the image-token queries of selected blocks; text tokens and all else unchanged."""
        def run(*a, **kw):
            return previous(func, *a, **kw) if previous is not None else func(*a, **kw)

        options = kwargs.get("transformer_options") or {}
        block = self._block(options)
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        if block is None or block not in self.blocks or len(args) < 3:
            return run(*args, **kwargs)
        if mask is not None:  # an attention mask (e.g. a padded text batch): not ours to widen, say so once
            if not self.warned_mask:
                self.warned_mask = True
                log.warning("StoryKit: %s block %s runs a masked attention; consistency is off in such calls "
                            "(unpad the text or give every frame one text length)", self.family.name, block)
            return run(*args, **kwargs)
        q, k, v = args[:3]
        if not kwargs.get("skip_reshape") and v.ndim == 4:  # SD3.5 hands v as [B, L, heads, D], q and k flat
            v = v.reshape(v.shape[0], v.shape[1], -1)
            args = (q, k, v, *args[3:])
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        split = bool(kwargs.get("skip_reshape"))  # [B, heads, L, D]; else [B, L, heads * D]
        axis = 2 if split else 1
        length = q.shape[axis]
        n_text, n_image, grid = layout
        if block[0] == "refiner" or not n_text:  # image-only self-attention (Lumina's noise refiner)
            start = 0
            if length != n_image:
                return run(*args, **kwargs)
        elif length >= n_text + n_image:  # joint [text ; image (; reference latents)]
            start = n_text
        else:
            return run(*args, **kwargs)  # text-only or another sequence (SD3.5's image-only attn2): not ours
        image = slice(start, start + n_image)
        call = SiteCall(block, halves_of(options, q.shape[0]), image, sigma_of(options), 0,
                        to_kv=functools.partial(_split_kv, q.shape[1] if split else 0),
                        take=functools.partial(_take_kv, k, v, split), heads=q.shape[1] if split else 0,
                        n_heads=heads or 0, grid=grid, text=slice(0, start) if start else None,
                        text_offset=self._register_tokens() if start else 0)
        if not technique.active(call):
            return run(*args, **kwargs)
        observe = getattr(technique, "observe", None)  # text-to-image attention maps (identity routing's masks)
        if observe is not None and start:
            observe(call, q.narrow(axis, start, n_image), k.narrow(axis, 0, start))
        rest = {key: value for key, value in kwargs.items() if key not in ("skip_reshape", "heads")}

        def attend(q_, k_, v_):
            return run(q_, k_, v_, heads, *args[4:], skip_reshape=split, **rest)

        # text queries (and reference-latent tokens after the image) first, before anything of ours is allocated:
        # the unpatched attention on the very same tensors, bit for bit
        own_text = getattr(technique, "attend_text", None)  # a technique that adds text rows (IPCA's exact path)
        text = own_text(call, q.narrow(axis, 0, start), k, v, attend) if start and own_text is not None else None
        pieces = ([run(q.narrow(axis, 0, start), k, v, *args[3:], **kwargs)] if text is None else [text]) \
            if start else []
        tail = length - start - n_image
        after = run(q.narrow(axis, start + n_image, tail), k, v, *args[3:], **kwargs) if tail > 0 else None
        out_image = technique.attend(call, q.narrow(axis, start, n_image), k, v, attend)
        if out_image is None:
            return run(*args, **kwargs)
        pieces.append(out_image)
        if after is not None:
            pieces.append(after)
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else out_image


def _enter_block(options: dict, block: tuple, module, args):
    options["storykit_block"] = block


def _take_kv(k: torch.Tensor, v: torch.Tensor, split: bool, row: int, index: torch.Tensor) -> torch.Tensor:
    """One row's sampled keys and values, side by side, token-major: [n, 2C] (what the bank stores)."""
    index = index.to(k.device)
    if split:  # [rows, heads, L, D]
        pick = [t[row].index_select(1, index).transpose(0, 1).reshape(index.numel(), -1) for t in (k, v)]
    else:
        pick = [t[row, index] for t in (k, v)]
    return torch.cat(pick, dim=-1)


def _split_kv(heads: int, stored: torch.Tensor):
    """Stored [M, 2C] -> keys and values [M, C], or heads-first [heads, M, D] for a heads-first call."""
    k, v = stored.chunk(2, dim=-1)
    if heads:
        k, v = (t.reshape(t.shape[0], heads, -1).transpose(0, 1) for t in (k, v))
    return k, v


def _patch_size(diffusion_model) -> int:
    patch = getattr(diffusion_model, "patch_size", 1)
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return int(patch or 1)
