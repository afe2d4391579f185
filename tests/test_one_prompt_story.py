"""One-Prompt-One-Story inside the real host: story encoder (tokens, SVR), IPCA on a tiny UNet, shared noise."""
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

ENCODE = "StoryKitOnePromptStoryEncode"
IPCA = "StoryKitIdentityPreservingCrossAttention"


def result(out):
    return out.result if hasattr(out, "result") else out


def pack_module(node_class):
    return sys.modules[node_class(ENCODE).__module__]


def encode_story(node_class, clip, identity, frames, window=10, mode="SVR", constants=(0.01, 1.0, 0.01, 0.05)):
    return result(node_class(ENCODE).execute(clip, identity, "\n".join(frames), window, mode, *constants))


def hf_tokenizer(clip):
    return clip.tokenizer.clip_l.tokenizer


def hf_content(clip, text):
    return hf_tokenizer(clip)(text)["input_ids"][1:-1]


def squash(text):
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------- token bookkeeping
def test_assembled_prompt_is_the_hosts_own_encoding_of_the_joined_text(node_class, tiny_sd15):
    clip = tiny_sd15[1]
    frames = ["reading a book, quietly", "(running:1.3) through snow!", "a fox asleep by the fire"]
    cond, info, n, texts = encode_story(node_class, clip, "a fox wearing a red scarf", frames, mode="none")
    joined = "a fox wearing a red scarf " + " ".join(frames)
    want, pooled = clip.encode_from_tokens(clip.tokenize(joined), return_pooled=True)
    for j in range(3):
        assert torch.equal(cond[0][0][j], want[0])
    assert torch.equal(cond[0][1]["pooled_output"][0], pooled[0])
    assert n == 3 and info.frames == 3 and texts.splitlines()[1] == "frame 2: " + joined


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_token_sets_select_each_frames_own_positions(node_class, host, kind, request):
    clip = request.getfixturevalue(f"tiny_{kind}")[1]
    mod = pack_module(node_class)
    identity = "a small fox in a red scarf"
    # repeats of the identity's words and of each other, punctuation, a weight; window 2 forces wrap-around
    frames = ["a fox in a red scarf runs, fast!", "the fox sleeps; the fox dreams.", "(red:1.2) scarf a fox",
              "a fox in a red scarf runs, fast!"]
    story = mod.plan_story(clip, identity, "\n".join(frames), window=2)
    lens = [len(hf_content(clip, f.replace("(red:1.2)", "red"))) for f in frames]
    n0 = len(hf_content(clip, identity))
    assert story.identity_len == n0
    for j, (fp, tokens, sets) in enumerate(zip(story.plan, story.tokens, story.sets, strict=True)):
        assert fp.order == (j, (j + 1) % 4) and fp.express == j
        start = 1 + n0
        assert sets.express == tuple(range(start, start + lens[j]))
        nxt = (j + 1) % 4
        assert sets.suppress == (tuple(range(start + lens[j], start + lens[j] + lens[nxt])),)
        end = start + lens[j] + lens[nxt]
        assert sets.eot == tuple(range(end, 77)) and sets.identity == tuple(range(n0 + 1))
        for key, (row,) in tokens.items():
            ids = [t[0] for t in row]
            assert ids[0] == 49406 and ids[end] == 49407 and len(ids) == 77
            dec = hf_tokenizer(clip).decode
            assert squash(dec(ids[1:1 + n0])) == squash(identity)
            assert squash(dec([ids[i] for i in sets.express])) == squash(frames[j].replace("(red:1.2)", "red"))
            assert squash(dec([ids[i] for i in sets.suppress[0]])) == squash(frames[nxt].replace("(red:1.2)", "red"))
            weights = [row[i][1] for i in sets.express]
            if j == 2:
                assert weights[0] == pytest.approx(1.2) and all(w == 1.0 for w in weights[1:])
            if key == "g":
                assert all(t == 0 for t in ids[end + 1:])     # CLIP-G pads with "!" (0): still EOT positions


def test_embedding_tokens_count_as_the_frames_positions(node_class, host, tiny_sdxl):
    clip = tiny_sdxl[1]
    folder = host.base / "models" / "embeddings"
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"clip_l": torch.randn(3, 768, generator=g), "clip_g": torch.randn(3, 1280, generator=g)},
                                str(folder / "storykit_tiny_emb.safetensors"))
    mod = pack_module(node_class)
    story = mod.plan_story(clip, "a fox", "embedding:storykit_tiny_emb wearing a hat\nsleeping", window=10)
    sets = story.sets[0]
    assert len(sets.express) == 3 + len(hf_content(clip, "wearing a hat"))
    for key, (row,) in story.tokens[0].items():
        vectors = [i for i, t in enumerate(row) if torch.is_tensor(t[0])]
        assert vectors == list(sets.express[:3]), key
        assert row[sets.express[0]][0].shape[-1] == (768 if key == "l" else 1280)
    assert story.sets[1].express == (sets.express[-1] + 1,)


def test_identity_prompt_too_long_says_how_many_tokens_over(node_class, tiny_sd15):
    clip = tiny_sd15[1]
    identity = " ".join(["fox"] * 70)
    with pytest.raises(ValueError, match=r"is 4 token\(s\) over") as info:
        encode_story(node_class, clip, identity, ["runs", "a b c d e f g h i"])
    assert "frame 2" in str(info.value) and "identity_prompt" in str(info.value)


# ---------------------------------------------------------------------------------------------- SVR
def numpy_reweight(e, rows, a, b, sign):
    rows = sorted(set(rows))
    u, s, vt = np.linalg.svd(e[rows].astype(np.float64).T, full_matrices=False)
    out = e.copy()
    out[rows] = (u @ np.diag(b * s * np.exp(sign * a * s)) @ vt).T
    return out


def expected_svr(raw, sets, parts, k):
    outs = []
    for part in np.split(raw.astype(np.float64), np.cumsum(parts)[:-1], axis=-1):
        for rows in sets.suppress:
            part = numpy_reweight(part, rows + sets.eot, k[2], k[3], -1)
        outs.append(numpy_reweight(part, sets.express + sets.eot, k[0], k[1], +1))
    return np.concatenate(outs, axis=-1)


@pytest.mark.parametrize("kind,parts", [("sd15", [768]), ("sdxl", [768, 1280])])
def test_svr_is_the_float64_formula_per_encoder(node_class, kind, parts, request):
    clip = request.getfixturevalue(f"tiny_{kind}")[1]
    identity, frames = "a fox in a red scarf", ["reads a book", "runs through snow, fast", "sleeps by a fire"]
    k = (0.05, 1.2, 0.02, 0.3)      # not the defaults, so every constant is checked where it goes
    for window in ((10, 2) if kind == "sd15" else (2,)):     # 2 of 3 frames per prompt: wrap-around windows
        raw = encode_story(node_class, clip, identity, frames, window, mode="none")[0][0]
        svr = encode_story(node_class, clip, identity, frames, window, mode="SVR", constants=k)[0][0]
        story = pack_module(node_class).plan_story(clip, identity, "\n".join(frames), window)
        for j, sets in enumerate(story.sets):
            want = expected_svr(raw[0][j].numpy(), sets, parts, k)
            np.testing.assert_allclose(svr[0][j].numpy(), want, rtol=2e-5, atol=2e-5)
            touched = set(sets.express + sets.eot).union(*sets.suppress)
            untouched = [i for i in range(77) if i not in touched]
            assert untouched[:len(sets.identity)] == list(sets.identity)
            assert torch.equal(svr[0][j][untouched], raw[0][j][untouched])
        assert torch.equal(svr[1]["pooled_output"], raw[1]["pooled_output"])
        if len(parts) == 2:   # one joint SVD over all 2048 channels is a different (wrong) result
            joint = expected_svr(raw[0][0].numpy(), story.sets[0], [2048], k)
            assert np.abs(joint - svr[0][0].numpy()).max() > 1e-3


def test_default_modes(node_class, tiny_sd15):
    clip = tiny_sd15[1]
    frames = ["reads a book", "runs"]
    raw = encode_story(node_class, clip, "a fox", frames, mode="none")[0][0][0]
    npr = encode_story(node_class, clip, "a fox", frames, mode="NPR")[0][0][0]
    story = pack_module(node_class).plan_story(clip, "a fox", "\n".join(frames), 10)
    ex, sup = list(story.sets[0].express), list(story.sets[0].suppress[0])
    assert torch.equal(npr[0][ex], raw[0][ex] * 2) and torch.equal(npr[0][sup], raw[0][sup] * 0.5)
    svr = encode_story(node_class, clip, "a fox", frames)[0][0][0]
    assert not torch.equal(svr, raw)


# ---------------------------------------------------------------------------------------------- IPCA
def unet_outputs(model, ctx, cond_or_uncond, x, sigma, y=None):
    import comfy.patcher_extension
    options = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(cond_or_uncond)
    extra = {"y": y} if y is not None else {}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options, **extra)


def ipca_case(node_class, models, sdxl=False):
    model, clip = models[0], models[1]
    cond, identity, n, _ = encode_story(node_class, clip, "a fox in a red scarf", ["reads a book", "runs in snow"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    sigma = torch.full((4,), 3.0)
    uncond = torch.zeros_like(cond[0][0])
    y = None
    if sdxl:
        pooled = torch.cat([torch.zeros_like(cond[0][1]["pooled_output"]), cond[0][1]["pooled_output"]])
        y = model.model.encode_adm(pooled_output=pooled, width=64, height=64, target_width=64, target_height=64,
                                   crop_w=0, crop_h=0, device="cpu")
    return model, identity, x, sigma, torch.cat([uncond, cond[0][0]]), y


def patched(node_class, model, identity, path, dropout=0.0):
    return result(node_class(IPCA).execute(model, identity, path, dropout, 0))[0]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ipca_bias_equals_concatenation_on_cond_rows_and_leaves_uncond_rows(node_class, kind, request):
    model, identity, x, sigma, ctx, y = ipca_case(node_class, request.getfixturevalue(f"tiny_{kind}"), kind == "sdxl")
    before = dict(model.model_options)
    plain = unet_outputs(model, ctx, [1, 0], x, sigma, y)
    bias = unet_outputs(patched(node_class, model, identity, "bias (fast)"), ctx, [1, 0], x, sigma, y)
    concat = unet_outputs(patched(node_class, model, identity, "concatenated (exact)"), ctx, [1, 0], x, sigma, y)
    assert torch.equal(bias[:2], plain[:2]) and torch.equal(concat[:2], plain[:2])
    torch.testing.assert_close(bias[2:], concat[2:], rtol=1e-5, atol=1e-5)
    assert (bias[2:] - plain[2:]).abs().max() > 100 * (bias[2:] - concat[2:]).abs().max()
    assert model.model_options == before    # the input MODEL is not patched


def test_ipca_finds_cond_rows_by_cond_or_uncond_not_order(node_class, tiny_sd15):
    model, identity, x, sigma, ctx, _ = ipca_case(node_class, tiny_sd15)
    m = patched(node_class, model, identity, "bias (fast)")
    swapped = torch.cat([ctx[2:], ctx[:2]])
    a = unet_outputs(m, ctx, [1, 0], x, sigma)
    b = unet_outputs(m, swapped, [0, 1], x, sigma)
    torch.testing.assert_close(a, torch.cat([b[2:], b[:2]]), rtol=1e-5, atol=1e-6)
    only_cond = unet_outputs(m, ctx[2:], [0], x[:2], sigma[:2])
    torch.testing.assert_close(only_cond, a[2:], rtol=1e-5, atol=1e-6)


def test_ipca_with_a_repeated_context_and_full_dropout(node_class, tiny_sd15):
    model, identity, x, sigma, ctx, _ = ipca_case(node_class, tiny_sd15)
    m = patched(node_class, model, identity, "bias (fast)")
    once = unet_outputs(m, ctx, [1, 0], x, sigma)
    twice = unet_outputs(m, ctx.repeat(1, 2, 1), [1, 0], x, sigma)     # what the host does for a longer negative
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)
    plain = unet_outputs(model, ctx, [1, 0], x, sigma)
    for path in ("bias (fast)", "concatenated (exact)"):
        dropped = unet_outputs(patched(node_class, model, identity, path, dropout=1.0), ctx, [1, 0], x, sigma)
        torch.testing.assert_close(dropped, plain, rtol=1e-5, atol=1e-5)
    half = patched(node_class, model, identity, "bias (fast)", dropout=0.5)
    half.pre_run()                          # ON_PRE_RUN reseeds the dropout: each run draws the same columns
    r1 = unet_outputs(half, ctx, [1, 0], x, sigma)
    half.pre_run()
    r2 = unet_outputs(half, ctx, [1, 0], x, sigma)
    assert torch.equal(r1, r2) and torch.equal(r1[:2], plain[:2])
    assert not torch.allclose(r1[2:], once[2:], atol=1e-6) and not torch.allclose(r1[2:], plain[2:], atol=1e-6)


def test_ipca_with_conditioning_concat_biases_only_the_encoders_block(node_class, host, tiny_sd15):
    """Conditioning Concat joins another prompt's 77 columns after the story's: the ln 2 bias belongs on the
    identity columns of the first block only (the same as adding a copy of those columns), not on the second's."""
    model, identity, x, sigma, ctx, _ = ipca_case(node_class, tiny_sd15)
    clip = tiny_sd15[1]
    story = [[ctx[2:], {}]]
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a castle on a hill at dawn"))
    other = [[other[0][0].repeat(2, 1, 1), other[0][1]]]  # the host's concat needs one row per frame
    joined = host.nodes.NODE_CLASS_MAPPINGS["ConditioningConcat"]().concat(story, other)[0][0][0]
    assert joined.shape[1] == 154
    count = identity.identity_count
    got = unet_outputs(patched(node_class, model, identity, "bias (fast)"), joined, [0], x[:2], sigma[:2])
    want = unet_outputs(model, torch.cat([joined, joined[:, :count]], dim=1), [0], x[:2], sigma[:2])
    wrong = unet_outputs(model, torch.cat([joined, joined[:, :count], joined[:, 77:77 + count]], dim=1), [0],
                         x[:2], sigma[:2])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - wrong).abs().max() > 100 * (got - want).abs().max()
    with pytest.raises(ValueError, match="Conditioning Concat.*Use the bias path"):
        unet_outputs(patched(node_class, model, identity, "concatenated (exact)"), joined, [0], x[:2], sigma[:2])


def test_ipca_rejects_an_identity_from_another_family(node_class, tiny_sd15, tiny_sdxl):
    identity = encode_story(node_class, tiny_sd15[1], "a fox", ["runs"])[1]
    with pytest.raises(ValueError, match="CLIP of the same checkpoint"):
        node_class(IPCA).execute(tiny_sdxl[0], identity, "bias (fast)", 0.0, 0)


# ---------------------------------------------------------------------------------------------- shared noise
def test_shared_noise_is_one_noise_for_every_frame_and_matches_the_ksampler_path(node_class, host):
    import comfy.sample
    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    noise = result(node_class("StoryKitSharedNoise").execute(11))[0]
    a = noise.generate_noise(latent)
    assert all(torch.equal(a[0], a[i]) for i in range(4))
    assert torch.equal(a, noise.generate_noise(latent)) and noise.seed == 11
    assert not torch.equal(a, result(node_class("StoryKitSharedNoise").execute(12))[0].generate_noise(latent))
    assert torch.equal(a[0], comfy.sample.prepare_noise(latent["samples"], 11)[0])    # frame 1 = stock frame 1
    marked = result(node_class("StoryKitSharedNoiseLatent").execute(latent))[0]
    assert marked["batch_index"] == [0, 0, 0, 0] and "batch_index" not in latent
    assert torch.equal(comfy.sample.prepare_noise(marked["samples"], 11, marked["batch_index"]), a)


def test_ksampler_with_the_shared_noise_latent_gives_identical_frames_for_identical_prompts(host, node_class,
                                                                                         tiny_sd15):
    model, clip, _ = tiny_sd15
    ctx, pooled = clip.encode_from_tokens(clip.tokenize("a fox"), return_pooled=True)
    positive = [[ctx.repeat(3, 1, 1), {"pooled_output": pooled.repeat(3, 1)}]]
    negative = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = {"samples": torch.zeros(3, 4, 8, 8)}
    sampler = host.nodes.KSampler()
    shared = result(node_class("StoryKitSharedNoiseLatent").execute(latent))[0]
    out = sampler.sample(model, 5, 2, 5.0, "euler", "normal", positive, negative, shared)[0]["samples"]
    same = dict(rtol=0, atol=1e-4 * out.abs().max().item())     # batched CPU kernels may differ in the last bit
    torch.testing.assert_close(out[1], out[0], **same)
    torch.testing.assert_close(out[2], out[0], **same)
    again = sampler.sample(model, 5, 2, 5.0, "euler", "normal", positive, negative, shared)[0]["samples"]
    assert torch.equal(out, again)
    stock = sampler.sample(model, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert (stock[0] - stock[1]).abs().max() > 0.1 * out.abs().max()



def test_ipca_runs_inside_the_stock_ksampler(host, node_class, tiny_sd15):
    model, clip, _ = tiny_sd15
    positive, identity, n, _ = encode_story(node_class, clip, "a fox in a red scarf", ["reads", "runs"])
    negative = [[torch.zeros_like(positive[0][0][:1]), {"pooled_output": torch.zeros_like(positive[0][1]["pooled_output"][:1])}]]
    latent = {"samples": torch.zeros(n, 4, 8, 8), "batch_index": [0] * n}
    sampler = host.nodes.KSampler()

    def run(m, cfg=5.0):
        return sampler.sample(m, 3, 2, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]
    plain = run(model)
    ipca = patched(node_class, model, identity, "bias (fast)")
    assert (run(ipca) - plain).abs().max() > 1e-3
    states = {id(p): p for p in ipca.model_options["transformer_options"]["patches_replace"]["attn2"].values()}
    layers = sum(1 for name, _ in model.model.diffusion_model.named_modules() if name.endswith(".attn2"))
    assert len(states) == 1 and len(ipca.model_options["transformer_options"]["patches_replace"]["attn2"]) == layers
    state = next(iter(states.values()))
    assert state.bias_cache == {} and state.generator is None      # per-run state dropped on ON_CLEANUP
    torch.testing.assert_close(run(patched(node_class, model, identity, "bias (fast)", dropout=1.0)), plain)
    biased1 = run(patched(node_class, model, identity, "bias (fast)"), cfg=1.0)      # no uncond rows at all
    exact1 = run(patched(node_class, model, identity, "concatenated (exact)"), cfg=1.0)
    torch.testing.assert_close(biased1, exact1, rtol=1e-4, atol=1e-4)
    assert (biased1 - run(model, cfg=1.0)).abs().max() > 1e-3
