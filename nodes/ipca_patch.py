"""Identity-Preserving Cross-Attention (One-Prompt-One-Story) on a DiT's joint attention, as a technique on
`attention_sites.JointAttention`.

Every block, every step, cond rows only: the image-token queries attend to the identity prompt's text keys twice
over. Bias path: the frame's own identity rows (prefix + P0 of the consolidated prompt) once more, which is the
paper's ln 2 logit bias; exact for causal encoders (Qwen2.5-VL, Qwen3, CLIP), whose rows at P0 are P0's own encoding.
Exact path (for T5, bidirectional): P0 encoded alone runs as extra text rows of each cond frame, appended after the
frame's text by an APPLY_MODEL wrapper; inside every block those rows' own queries see only themselves and the
frame's image (their text stream is the one P0 alone would have beside this image), the frame's text queries never
see them (their attention is the unpatched model's), and the image queries see both: the keys and values of the
identity prompt alone, block by block, appended. Text-token queries are never biased; uncond rows are untouched.
"""
from __future__ import annotations

import functools
import logging

import torch

from ..kernels import one_prompt_story as ops
from . import attention_sites as sites

log = logging.getLogger("storykit")

WRAPPER_KEY = "storykit_ipca_identity_rows"

# model_config classes (comfy.supported_models) -> the tokenizer keys of the text encoder the family was trained with
MODEL_ENCODERS = [
    ("Flux2", ("mistral3_24b",), "Mistral 3 Small (FLUX.2, CLIPLoader type flux2)"),
    ("ChromaRadiance", ("t5xxl",), "T5-XXL (Chroma)"),
    ("Chroma", ("t5xxl",), "T5-XXL (Chroma)"),
    ("Flux", ("l", "t5xxl"), "T5-XXL + CLIP-L (FLUX.1, DualCLIPLoader type flux)"),
    ("QwenImage", ("qwen25_7b",), "Qwen2.5-VL (Qwen-Image, CLIPLoader type qwen_image)"),
    ("ZImage", ("qwen3_4b",), "Qwen3 (Z-Image, CLIPLoader type lumina2)"),
    ("Lumina2", None, "Gemma 2 (Lumina 2: not supported by One-Prompt-One-Story yet)"),
    ("SD3", ("g", "l", "t5xxl"), "CLIP-L/G + T5-XXL (SD3.5)"),
]

# model_config classes whose model pads the text context in front before attention (model_base.Flux2: to 512 rows),
# which moves the identity's rows by the padding
FRONT_PADDED = ("Flux2",)


def expected_encoder(model) -> tuple[tuple | None, str] | None:
    """(tokenizer keys, name) of the text encoder this MODEL's family uses; None for a model that is not a DiT."""
    names = [c.__name__ for c in type(model.model.model_config).__mro__]
    for cls, keys, name in MODEL_ENCODERS:
        if cls in names:
            return keys, name
    return None


class JointIPCA:
    """The IPCA technique on joint attention (see the module doc). One per patched MODEL."""

    def __init__(self, identity, exact: bool, text_offset: int, front_padded: bool = False):
        self.identity, self.exact, self.front_padded = identity, exact, front_padded
        self.offset = text_offset                   # rows before the context in the joint text (SD3's register)
        self.columns = torch.tensor([r + text_offset for r in identity.identity_rows], dtype=torch.long)
        self.context_len: int | None = None         # per model call (exact path): the frames' own text rows

    def _columns(self, n_text: int) -> torch.Tensor:
        """The identity's key columns in this call: moved by the padding a front-padding model (FLUX.2) put before
        the frames' context."""
        if not self.front_padded:
            return self.columns
        context = self.context_len if self.context_len is not None else n_text - self.offset
        return self.columns + max(0, context - self.identity.context_length)

    def __deepcopy__(self, memo):
        return self

    # the site's technique interface
    def writing(self) -> bool:
        return False

    def capture(self, call, tokens) -> None:
        return None

    def active(self, call) -> bool:
        return self.exact and self.context_len is not None or any(half == 0 for half, _ in call.halves)

    def attend(self, call, q, k, v, attend):
        """q: the image-token queries, k, v: every token, in the call's layout (call.heads > 0: heads-first)."""
        axis = 2 if call.heads else 1
        n_text = call.image.start
        exact = self.exact and self.context_len is not None
        own = self.offset + (self.context_len or 0)      # exact path: the frame's text ends here, P0 alone follows
        columns = self._columns(n_text)
        outs = []
        for half, rows in call.halves:
            qh, kh, vh = q[rows], k[rows], v[rows]
            if exact:
                frame_k = torch.cat([kh.narrow(axis, 0, own), kh.narrow(axis, n_text, kh.shape[axis] - n_text)], axis)
                frame_v = torch.cat([vh.narrow(axis, 0, own), vh.narrow(axis, n_text, vh.shape[axis] - n_text)], axis)
                if half == 0:
                    outs.append(ops.ipca_joint_attention(qh, frame_k, frame_v, columns, attend,
                                                         kh.narrow(axis, own, n_text - own),
                                                         vh.narrow(axis, own, n_text - own), axis))
                else:
                    outs.append(attend(qh, frame_k, frame_v))
            elif half == 0:
                outs.append(ops.ipca_joint_attention(qh, kh, vh, columns, attend, axis=axis))
            else:
                outs.append(attend(qh, kh, vh))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def attend_text(self, call, q, k, v, attend):
        """Exact path only: text queries of the frame see [frame text ; image] (the unpatched model's keys), the
        appended P0-alone rows see [P0 alone ; image]. None: the site's own handling (bias path)."""
        if not (self.exact and self.context_len is not None):
            return None
        axis = 2 if call.heads else 1
        n_text = call.image.start
        own = self.offset + self.context_len

        def part(t, first, count):
            return torch.cat([t.narrow(axis, first, count), t.narrow(axis, n_text, t.shape[axis] - n_text)], axis)
        first = attend(q.narrow(axis, 0, own), part(k, 0, own), part(v, 0, own))
        alone = attend(q.narrow(axis, own, n_text - own), part(k, own, n_text - own), part(v, own, n_text - own))
        return torch.cat([first, alone], dim=1)

    # exact path: P0 alone as extra text rows of every row of the call
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):  # noqa: B006 - host signature
        if c_crossattn is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        alone = self.identity.identity_context.to(c_crossattn)
        extended = torch.cat([c_crossattn, alone.expand(c_crossattn.shape[0], -1, -1)], dim=1)
        self.context_len = c_crossattn.shape[1]
        try:
            return executor(x, t, c_concat, extended, control, transformer_options, **kwargs)
        finally:
            self.context_len = None


def patch_dit(model, identity, exact: bool, node: str):
    """Clone `model` and install IPCA on every joint-attention block of its family."""
    import comfy.patcher_extension
    base = model.model
    family = sites.family_of(base)
    if family is None:
        raise ValueError(f"{node}: {type(base).__name__} is not a model StoryKit can patch; supported: "
                         f"{sites.SUPPORTED}")
    diffusion_model = base.diffusion_model
    available = sites.JointAttention.available(family, diffusion_model)
    blocks = {(kind, i) for kind, count in available.items() if kind != "refiner" for i in range(count)}
    site = sites.JointAttention(family, diffusion_model, blocks)
    offset = site._text_tokens(None)       # tokens the model puts before the context (SD3.5's register)
    names = {c.__name__ for c in type(base.model_config).__mro__}
    state = JointIPCA(identity, exact, offset, front_padded=any(n in names for n in FRONT_PADDED))
    patched = model.clone()
    if exact:   # outermost: the site's own wrapper then sees the extended context (its layout counts those rows)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     functools.partial(JointIPCA.apply_model, state))
    site.install(patched, state)
    log.info("%s: IPCA (%s path) on %s, %d identity rows of %s", node, "exact" if exact else "bias",
             family.name, len(identity.identity_rows), identity.encoder_name)
    return patched
