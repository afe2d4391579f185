"""Story Prompt and Story Sampler nodes in the real host, and the shipped example workflows."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STORY = """[Mia] a young woman with red hair, green raincoat
[Otto] an old man with a beard
[Mia] wakes up # Monday.
[Otto] feeds pigeons
[Mia] runs for the tram
[Otto] reads a paper
[Mia] and [Otto] share an umbrella # They meet.
[NC] an empty street # The end."""


def _prompt(node_class, clip, story=STORY, **kw):
    args = dict(clip=clip, story=story, style="Comic book", custom_style="", negative="blurry",
                references_per_character=2, reference_mode="auto")
    args.update(kw)
    return node_class("StoryKitStoryPrompt").execute(**args).result


def test_story_prompt_batches_frames_and_pads_by_repetition(node_class, tiny_sd15):
    clip = tiny_sd15[1]
    long_frame = "[Mia] " + ", ".join(["walks along a long river under a sky full of stars"] * 8)
    story = STORY.replace("[Otto] reads a paper", long_frame)
    positive, negative, plan, captions = _prompt(node_class, clip, story)
    cond = positive[0][0]
    assert cond.shape[0] == 6 and cond.shape[1] == 154 and cond.shape[2] == 768
    assert captions.split("\n") == ["Monday.", "", "", "", "They meet.", "The end."]
    assert plan.frames[0].prompt.startswith("comic book panel, a young woman with red hair")
    alone = clip.encode_from_tokens(clip.tokenize(plan.frames[0].prompt))
    torch.testing.assert_close(cond[0, :77], alone[0])
    torch.testing.assert_close(cond[0, 77:], alone[0])  # padded by repeating: same cross-attention result
    assert negative[0][0].shape[0] == 1 and "photograph" in plan.negative


def test_story_prompt_sdxl_has_pooled_per_frame(node_class, tiny_sdxl):
    positive, _, plan, _ = _prompt(node_class, tiny_sdxl[1])
    cond, extra = positive[0]
    assert cond.shape == (6, 77, 2048) and extra["pooled_output"].shape == (6, 1280)


def test_story_prompt_pads_flux2_frames_with_mistrals_pad_token_as_the_host_pads(node_class, host):
    """FLUX.2's Mistral encoder: every frame padded to the longest with the host's own padding (tokenizer option
    mistral3_24b_min_length: pad 11, on the left), each row the host's encoding of that, and pooled_output None
    as CLIPTextEncode gives it (FLUX models read the key)."""
    from storykit.runner import testmodels
    clip = testmodels.tiny_models("flux2", 0)[1]
    positive, _, plan, _ = _prompt(node_class, clip)
    cond, extra = positive[0]
    assert "pooled_output" in extra and extra["pooled_output"] is None
    lengths = [len(clip.tokenize(f.prompt)["mistral3_24b"][0]) for f in plan.frames]
    assert len(set(lengths)) > 1 and cond.shape == (len(plan.frames), max(lengths), 3 * 64)
    for row, frame in zip(cond, plan.frames, strict=True):
        tokens = clip.tokenize(frame.prompt, tokenizer_options={"mistral3_24b_min_length": max(lengths)})
        ids = [t[0] for t in tokens["mistral3_24b"][0]]
        pads = max(lengths) - len(clip.tokenize(frame.prompt)["mistral3_24b"][0])
        assert ids[:pads] == [11] * pads and ids[pads] == 1      # <pad>s, then <s>
        torch.testing.assert_close(row, clip.encode_from_tokens(tokens)[0])


def test_story_prompt_too_many_tokens(node_class, tiny_sd15):
    story = "[Mia] " + "very " * 300 + "tall\n[Mia] waves"
    with pytest.raises(ValueError, match=r"line 2: the prompt is longer than 225 tokens.*shorten"):
        _prompt(node_class, tiny_sd15[1], story)


def _sample(node_class, model, positive, negative, plan, batch_size, steps=2, sampler="euler", seed_mode="same",
            custom_sampler=None, **kw):
    if custom_sampler is not None:
        kw["sampler"] = custom_sampler
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    mode = "same for all frames" if seed_mode == "same" else "per frame (seed + frame number)"
    return node_class("StoryKitStorySampler").execute(
        model=model, positive=positive, negative=negative, story=plan, latent_image=latent, seed=3, seed_mode=mode,
        steps=steps, cfg=4.0, sampler_name=sampler, scheduler="normal", batch_size=batch_size, denoise=1.0,
        **kw).result[0]


def _csa(node_class, model, rate=0.5, **kw):
    args = dict(model=model, sampling_rate=rate, rate_per_level="", layers="decoder", start_percent=0.0,
                end_percent=1.0, skip_probability=0.0, seed=0, window_size=0, bank_precision="fp32",
                bank_location="cpu")
    args.update(kw)
    return node_class("StoryKitConsistentSelfAttention").execute(**args).result[0]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_story_sampler_result_does_not_depend_on_batch_size(node_class, tiny_sd15, sampler):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip, references_per_character=1)  # single-character readers
    patched = _csa(node_class, model.clone())
    state = patched.get_attachment("storykit_csa")
    one = _sample(node_class, patched, positive, negative, plan, batch_size=1, sampler=sampler)["samples"]
    assert state.bank.nbytes() == 0  # released at the end of the story run
    four = _sample(node_class, patched, positive, negative, plan, batch_size=4, sampler=sampler)["samples"]
    assert one.shape == (6, 4, 8, 8) and torch.isfinite(one).all()
    torch.testing.assert_close(one, four, atol=1e-4, rtol=1e-4)
    plain = _sample(node_class, model, positive, negative, plan, batch_size=4, sampler=sampler)["samples"]
    readers = plan.reader_indices()
    nc = [f.index for f in plan.frames if not f.characters]
    assert not torch.allclose(one[readers[0]], plain[readers[0]], atol=1e-5)  # the bank changed the frame
    torch.testing.assert_close(one[nc], plain[nc], atol=1e-5, rtol=1e-5)  # [NC]: plain attention


def test_story_sampler_takes_a_sampler_and_sigmas_as_custom_sampler_graphs_build_them(node_class, tiny_sd15):
    import comfy.samplers
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = _csa(node_class, model.clone())
    plain = _sample(node_class, patched, positive, negative, plan, batch_size=4)["samples"]
    sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "normal", 2).cpu()
    custom = _sample(node_class, patched, positive, negative, plan, batch_size=4,
                     custom_sampler=comfy.samplers.sampler_object("euler"), sigmas=sigmas)["samples"]
    torch.testing.assert_close(custom, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than 2 values"):
        _sample(node_class, patched, positive, negative, plan, batch_size=4, sigmas=sigmas[:1])


def test_a_bank_over_its_budget_re_runs_the_references_and_gives_the_same_pictures(node_class, tiny_sd15, caplog):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = _csa(node_class, model.clone())
    state = patched.get_attachment("storykit_csa")
    with caplog.at_level("INFO", logger="storykit"):
        banked = _sample(node_class, patched, positive, negative, plan, batch_size=2)["samples"]
    assert "MB per reference per step" in caplog.text and "re-run" not in caplog.text
    written = []
    real_write = state.bank.write
    state.bank.write = lambda *a, **k: written.append(1) or real_write(*a, **k)
    with caplog.at_level("INFO", logger="storykit"):
        rerun = _sample(node_class, patched, positive, negative, plan, batch_size=2, bank_memory_gb=1e-9)["samples"]
    assert "re-run beside every reader batch" in caplog.text and not written
    torch.testing.assert_close(rerun, banked, atol=1e-4, rtol=1e-4)
    assert state.bank_enabled


def test_story_sampler_per_frame_seeds_and_cancel_releases_bank(node_class, tiny_sd15, monkeypatch):
    import comfy.model_management
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    patched = _csa(node_class, model.clone())
    state = patched.get_attachment("storykit_csa")
    out = _sample(node_class, patched, positive, negative, plan, batch_size=2, seed_mode="per frame")["samples"]
    assert not torch.allclose(out[1], out[3])
    calls = []
    real = comfy.model_management.throw_exception_if_processing_interrupted

    def cancel_while_reading():  # Cancel pressed once the readers run: the bank is full then
        calls.append(state.bank.nbytes())
        if state.plan and not state.plan[0].reference:
            comfy.model_management.interrupt_current_processing(True)
        return real()
    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", cancel_while_reading)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(node_class, patched, positive, negative, plan, batch_size=2)
    assert max(calls) > 0 and state.bank.nbytes() == 0 and state.plan is None


def test_story_sampler_rejects_mismatched_conditioning(node_class, tiny_sd15):
    model, clip, _ = tiny_sd15
    positive, negative, plan, _ = _prompt(node_class, clip)
    wrong = [[positive[0][0][:3], {}]]
    with pytest.raises(ValueError, match="positive has 3 prompts but the story has 6 frames"):
        _sample(node_class, model, wrong, negative, plan, batch_size=2)


@pytest.mark.parametrize("name,kind", [("storykit_csa_sd15", "sd15"), ("storykit_csa_sdxl", "sdxl")])
def test_example_workflow_runs_headless(run_workflow, name, kind):
    result = run_workflow(REPO / "workflows" / f"{name}.json", tiny_model=kind,
                          overrides=["5.steps=2", "4.width=64", "4.height=64", "5.batch_size=3"])
    assert result is not None


@pytest.mark.parametrize("rate,per_level,name", [(float("nan"), "", "sampling_rate"), (0.5, "0.5, nan", "rate_per_level")])
def test_nan_rate_is_reported_as_the_input_that_holds_it(node_class, tiny_sd15, rate, per_level, name):
    """The host's range check lets NaN through (every comparison with NaN is false): the node names the input."""
    model, _, _ = tiny_sd15
    with pytest.raises(ValueError, match=rf"{name} has nan.*between 0.0 and 1.0"):
        _csa(node_class, model.clone(), rate=rate, rate_per_level=per_level)
