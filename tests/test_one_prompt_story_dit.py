"""One-Prompt-One-Story on the DiT text encoders and joint attention, in the real host on the tiny DiT families:
token positions against the host's tokenizer, SVR per encoder output, IPCA (bias and exact path) against attention
computed from scratch, the encoder/model family check, shared noise on a flow model."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from storykit.runner import testmodels

from .test_csa_dit import _apply, _canonical, _inputs, _spy
from .test_one_prompt_story import expected_svr, result

KINDS = ["flux", "flux2", "chroma", "qwen_image", "z_image", "sd3"]
IDENTITY = "a watercolor fox wearing a red scarf"
FRAMES = ["reading a book, quietly", "(running:1.2) through snow!", "sleeping by the fire", "a fox waves hello"]


def story_module():
    from storykit.nodes import nodes_one_prompt_story as mod
    return mod


def encode(clip, frames=FRAMES, window=10, mode="SVR", k=(0.01, 1.0, 0.01, 0.05), identity=IDENTITY):
    return result(story_module().OnePromptStoryEncode.execute(clip, identity, "\n".join(frames), window, mode, *k))


def ipca(model, identity, path="bias (fast)"):
    return result(story_module().IdentityPreservingCrossAttention.execute(model, identity, path, 0.0, 0))[0]


# ---------------------------------------------------------------------------------------------- token bookkeeping
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [10, 2])
def test_token_sets_are_the_hosts_tokenization_of_the_joined_prompt(host, kind, window):
    mod = story_module()
    clip = testmodels.tiny_models(kind, 0)[1]
    story = mod.plan_story(clip, IDENTITY, "\n".join(FRAMES), window)
    toks = story.toks
    for j, (fp, tokens) in enumerate(zip(story.plan, story.tokens, strict=True)):
        assert fp.express == j and len(fp.order) == min(window, len(FRAMES))
        assert fp.order[0] == j if window < len(FRAMES) else fp.order == (0, 1, 2, 3)
        joined = " ".join([IDENTITY] + [FRAMES[f] for f in fp.order])
        want = clip.tokenize(joined)
        for key in tokens:
            ids = [t[0] for t in tokens[key][0]]
            host_ids = [t[0] for batch in want[key] for t in batch]
            if key in story.key_sets and window < len(FRAMES):    # padded to the longest window
                host_ids = host_ids + ids[len(host_ids):]
            assert ids == host_ids, (kind, key)
            assert [t[1] for t in tokens[key][0]][:len(want[key][0])] == [t[1] for t in want[key][0]]
        for key, sets in story.key_sets.items():
            sets = sets[j]
            ids = [t[0] for t in tokens[key][0]]
            prefix = len(toks[key].prefix)
            frame = [t[0] for t in mod.content_tokens(clip, FRAMES[j], toks, first=False)[key]]
            alone = [t[0] for t in mod.content_tokens(clip, IDENTITY, toks)[key]]
            assert [ids[i] for i in sets.express] == frame, (kind, key)
            assert sets.identity == tuple(range(prefix + len(alone)))
            assert ids[prefix:prefix + len(alone)] == alone and ids[:prefix] == [t[0] for t in toks[key].prefix]
            for f, rows in zip([f for f in fp.order if f != j], sets.suppress, strict=True):
                assert [ids[i] for i in rows] == [t[0] for t in
                                                 mod.content_tokens(clip, FRAMES[f], toks, first=False)[key]]
            suffix = [t[0] for t in toks[key].suffix]
            assert ids[sets.eot[0]:sets.eot[0] + len(suffix)] == suffix and sets.eot[-1] == len(ids) - 1


def test_llm_template_head_is_counted_and_dropped_where_the_host_drops_it(host):
    mod = story_module()
    qwen = testmodels.tiny_models("qwen_image", 0)[1]
    z = testmodels.tiny_models("z_image", 0)[1]
    for clip, dropped in ((qwen, True), (z, False)):
        story = mod.plan_story(clip, IDENTITY, "\n".join(FRAMES), 10)
        key = story.encoder[0]
        tokens = story.tokens[0][key][0]
        cond = clip.encode_from_tokens(story.tokens[0])
        head = len(story.toks[key].prefix)
        assert cond.shape[1] == len(tokens) - (head if dropped else 0)
        info = encode(clip)[1]
        n0 = len(mod.content_tokens(clip, IDENTITY)[key])
        assert info.identity_rows == tuple(range(n0 if dropped else head + n0)) and info.causal


def test_identity_too_long_names_the_encoder_budget(host):
    clip = testmodels.tiny_models("sd3", 0)[1]
    with pytest.raises(ValueError, match=r"over 75 \(CLIP-L/G \+ T5-XXL \(SD3.5\), [lg]\)"):
        encode(clip, identity=" ".join(["fox"] * 74))
    flux = testmodels.tiny_models("flux", 0)[1]        # FLUX.1: CLIP-L is pooled only, T5 sets no budget
    assert encode(flux, identity=" ".join(["fox"] * 90), frames=["runs"])[2] == 1


# ---------------------------------------------------------------------------------------------- SVR
@pytest.mark.parametrize("kind", KINDS)
def test_svr_reweights_each_encoders_rows_and_nothing_else(host, kind):
    mod = story_module()
    clip = testmodels.tiny_models(kind, 0)[1]
    k = (0.05, 1.2, 0.02, 0.3)
    raw = encode(clip, mode="none")[0][0]
    svr = encode(clip, mode="SVR", k=k)[0][0]
    story = mod.plan_story(clip, IDENTITY, "\n".join(FRAMES), 10)
    assert torch.equal(raw[0], torch.cat([clip.encode_from_tokens(t) for t in story.tokens]))
    for j in range(len(FRAMES)):
        parts = mod.row_parts(story.encoder, story.tokens[j], raw[0].shape[1], raw[0].shape[2])
        want = raw[0][j].double().numpy().copy()
        touched = set()
        for key, offset, slices in parts:
            sets = mod.ops.shift_sets(story.key_sets[key][j], offset)
            for ch in slices:   # one slice per encoder; FLUX.2: one per stacked Mistral hidden state
                want[:, ch] = expected_svr(want[:, ch], sets, [ch.stop - ch.start], k)
            touched |= set(sets.express + sets.eot).union(*sets.suppress)
        np.testing.assert_allclose(svr[0][j].double().numpy(), want, rtol=2e-5, atol=2e-5)
        untouched = [i for i in range(raw[0].shape[1]) if i not in touched]
        assert torch.equal(svr[0][j][untouched], raw[0][j][untouched])
        if kind == "qwen_image":     # the template head is not in the output: row 0 is P0's first token
            assert parts[0][1] == -len(story.toks["qwen25_7b"].prefix)
        if kind == "flux2":          # hidden states 10, 20 and 30 side by side: each reweighted on its own
            assert [ch for _, _, slices in parts for ch in slices] == [slice(0, 64), slice(64, 128), slice(128, 192)]
    for key in ("pooled_output", "attention_mask"):
        if isinstance(raw[1].get(key), torch.Tensor):
            assert torch.equal(svr[1][key], raw[1][key]) and svr[1][key].shape[0] == len(FRAMES)


# ---------------------------------------------------------------------------------------------- IPCA
def _story_inputs(kind, frames=2):
    model, clip, _ = testmodels.tiny_models(kind, 0)
    cond, identity, _, _ = encode(clip, frames=FRAMES[:frames])
    x, _, extra = _inputs(model, clip, frames)
    return model, identity, x, cond[0][0], extra


@pytest.mark.parametrize("kind", KINDS)
def test_ipca_bias_is_the_ln2_logit_bias_on_image_queries_and_text_is_untouched(host, kind, monkeypatch):
    from storykit.kernels import one_prompt_story as ops
    model, identity, x, context, extra = _story_inputs(kind)
    patched = ipca(model, identity)
    seen = _spy(monkeypatch)
    out = _apply(patched, x, context, extra, [0])
    plain = _apply(model, x, context, extra, [0])
    assert not torch.allclose(out, plain, atol=1e-7), "IPCA changed nothing"
    checked = 0
    for call in seen:
        q, k, v = call["args"][:3]
        heads = call["args"][3] if len(call["args"]) > 3 else call["kwargs"]["heads"]
        split = bool(call["kwargs"].get("skip_reshape"))
        n_text, n_image, _ = call["layout"]
        if not call["selected"] or q.shape[2 if split else 1] < n_text + n_image or call["block"][0] == "refiner":
            assert torch.equal(call["out"], call["plain"])
            continue
        qc, kc, vc = (_canonical(t, split) for t in (q, k, v))
        image = slice(n_text, n_text + n_image)
        # SD3.5's register tokens lead the text; FLUX.2 pads the text in front to 512 rows (model_base.Flux2)
        offset = n_text - context.shape[1] if kind in ("sd3", "flux2") else 0
        columns = [r + offset for r in identity.identity_rows]
        want = ops.ipca_bias_reference(qc[:, image], kc, vc, heads, columns)
        torch.testing.assert_close(call["out"][:, image].double(), want, atol=2e-5, rtol=1e-4)
        # text queries: the site's unpatched attention on the same tensors (narrowed to the text rows, so CPU
        # matmul blocking may differ in the last bit: measured up to 1.1e-7 on Chroma/Qwen-Image tiny shapes)
        torch.testing.assert_close(call["out"][:, :n_text], call["plain"][:, :n_text], atol=1e-6, rtol=0)
        checked += 1
    assert checked >= 2


def _scratch(q, k, v, heads, rows, cols):
    """softmax(Q K^T / sqrt(d)) V in float64 for queries `rows` over key columns `cols`."""
    d = q.shape[-1] // heads
    qh, kh, vh = (t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)
                  for t in (q[:, rows], k[:, cols], v[:, cols]))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, -1)
    return (w @ vh).transpose(1, 2).reshape(q.shape[0], -1, heads * d)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_ipca_exact_path_appends_p0_alone_and_keeps_text_queries_apart(host, kind, monkeypatch):
    model, identity, x, context, extra = _story_inputs(kind)
    assert not identity.causal and identity.identity_context.shape[1] == len(identity.identity_rows)
    patched = ipca(model, identity, "concatenated (exact)")
    seen = _spy(monkeypatch)
    _apply(patched, x, context, extra, [0])
    n_ctx, n0 = context.shape[1], identity.identity_context.shape[1]
    checked = 0
    for call in seen:
        q, k, v = call["args"][:3]
        heads = call["args"][3]
        n_text, n_image, _ = call["layout"]
        assert n_text == n_ctx + n0                         # P0 alone rides as extra text rows
        qc, kc, vc = (_canonical(t, True) for t in (q, k, v))
        img = slice(n_text, n_text + n_image)
        scratch = functools.partial(_scratch, qc, kc, vc, heads)
        frame_cols = list(range(n_ctx)) + list(range(n_text, n_text + n_image))
        alone_cols = list(range(n_ctx, n_text)) + list(range(n_text, n_text + n_image))
        everything = list(range(n_text + n_image))
        out = call["out"].double()
        torch.testing.assert_close(out[:, img], scratch(img, everything), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, :n_ctx], scratch(slice(0, n_ctx), frame_cols), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, n_ctx:n_text], scratch(slice(n_ctx, n_text), alone_cols),
                                   atol=2e-5, rtol=1e-4)
        checked += 1
    assert checked == len(seen) >= 2


@pytest.mark.parametrize("kind", ["flux", "flux2", "qwen_image"])
def test_ipca_leaves_uncond_rows_and_causal_exact_is_the_bias(host, kind):
    model, identity, x, context, extra = _story_inputs(kind)
    bias = ipca(model, identity)
    uncond = _apply(bias, x, context, extra, [1])
    torch.testing.assert_close(uncond, _apply(model, x, context, extra, [1]), atol=0, rtol=0)
    if identity.causal:     # the exact path on a causal encoder is the bias path itself
        exact = ipca(model, identity, "concatenated (exact)")
        assert torch.equal(_apply(exact, x, context, extra, [0]), _apply(bias, x, context, extra, [0]))


def test_bias_vs_exact_on_t5_is_an_approximation_measured(host):
    """The bias path on T5 differs from the exact path (T5 reads P0 beside the frames); both move the output."""
    model, identity, x, context, extra = _story_inputs("chroma")
    plain = _apply(model, x, context, extra, [0])
    bias = _apply(ipca(model, identity), x, context, extra, [0])
    exact = _apply(ipca(model, identity, "concatenated (exact)"), x, context, extra, [0])
    effect = (exact - plain).norm() / plain.norm()
    gap = (bias - exact).norm() / (exact - plain).norm()
    assert effect > 1e-6 and 0 < gap < 2.0


def test_ipca_refuses_an_identity_from_another_encoder(host, tiny_sd15):
    mod = story_module()
    flux_model, flux_clip, _ = testmodels.tiny_models("flux", 0)
    qwen_model, qwen_clip, _ = testmodels.tiny_models("qwen_image", 0)
    flux_identity = encode(flux_clip)[1]
    with pytest.raises(ValueError, match=r"encoded with T5-XXL \+ CLIP-L \(FLUX.1\).*expects Qwen2.5-VL"):
        ipca(qwen_model, flux_identity)
    with pytest.raises(ValueError, match=r"expects T5-XXL \+ CLIP-L \(FLUX.1"):
        ipca(flux_model, encode(qwen_clip)[1])
    sd15_identity = result(mod.OnePromptStoryEncode.execute(tiny_sd15[1], "a fox", "runs", 10, "SVR",
                                                            0.01, 1.0, 0.01, 0.05))[1]
    with pytest.raises(ValueError, match=r"CLIP-L \(SD1.5\).*expects T5-XXL"):
        ipca(flux_model, sd15_identity)
    with pytest.raises(ValueError, match=r"expects CLIP-L \(SD1.5\) or CLIP-L \+ CLIP-G"):
        ipca(tiny_sd15[0], flux_identity)
    flux2 = testmodels.tiny_models("flux2", 0)[0]
    with pytest.raises(ValueError, match="Mistral"):
        ipca(flux2, flux_identity)


# ---------------------------------------------------------------------------------------------- shared noise
def test_shared_noise_on_flux_gives_identical_frames_for_identical_prompts(host):
    import comfy.sample
    import comfy.samplers
    mod = story_module()
    model, clip, _ = testmodels.tiny_models("flux", 0)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))
    latent = {"samples": torch.zeros(3, 16, 8, 8)}
    noise = mod.SharedNoiseSource(5).generate_noise(latent)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[1], noise[2])
    marked = result(mod.SharedNoiseLatent.execute(latent))[0]
    ksampler_noise = comfy.sample.prepare_noise(marked["samples"], 5, marked["batch_index"])
    assert torch.equal(ksampler_noise, noise)
    out = comfy.sample.sample(model, noise, 3, 1.0, "euler", "simple", cond, [], latent["samples"], seed=5)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[0], out[2], atol=1e-5)
    other = comfy.sample.sample(model, comfy.sample.prepare_noise(latent["samples"], 5), 3, 1.0, "euler", "simple",
                                cond, [], latent["samples"], seed=5)
    assert not torch.allclose(other[0], other[1], atol=1e-3)
