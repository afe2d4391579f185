"""Textual Inversion and DreamBooth trainers inside the real host, on the seeded tiny models.

Files go to the session's models folders; every check loads them back through the host's stock paths
(CLIPTextEncode with embedding:NAME, LoraLoader, the checkpoint state-dict layout).
"""
from __future__ import annotations

import sys

import pytest
import safetensors.torch
import torch

RES = 64  # 8x8 latents: the tiny models run a step in about a second on 2 CPU cores


def subject(n: int = 3) -> torch.Tensor:
    """A tiny synthetic subject: a red disc with a yellow stripe on blue, moved a little in each picture."""
    yy, xx = torch.meshgrid(torch.arange(RES), torch.arange(RES), indexing="ij")
    out = []
    for i in range(n):
        img = torch.zeros(RES, RES, 3)
        img[..., 2] = 0.8
        disc = ((yy - 30 - 2 * i) ** 2 + (xx - 28 - 3 * i) ** 2) < 18 ** 2
        img[disc] = torch.tensor([0.9, 0.1, 0.1])
        img[(yy - 30 - 2 * i).abs() < 3 & disc] = torch.tensor([1.0, 0.9, 0.1])
        out.append(img)
    return torch.stack(out)


@pytest.fixture(scope="module")
def mod(host):
    return sys.modules[host.nodes.NODE_CLASS_MAPPINGS["StoryKitTrainTextualInversion"].__module__]


@pytest.fixture(scope="module")
def tr(mod):
    return sys.modules[mod.__name__.rsplit(".", 1)[0] + ".training"]


def load(*patchers) -> None:
    """Make these MODEL/CLIP patchers' weights current (clones share modules; the host patches on load)."""
    import comfy.model_management
    comfy.model_management.load_models_gpu(list(patchers))


def snapshot(*modules) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def assert_unchanged(before: list[dict], *modules) -> None:
    for snap, module in zip(before, modules, strict=True):
        now = module.state_dict()
        assert snap.keys() == now.keys()
        for k, v in snap.items():
            assert torch.equal(v, now[k]), f"frozen weight {k} changed"


def fixed_eval_loss(tr, model, latents, cond, pooled, draws: int = 12) -> float:
    """The denoising loss on fixed noises and noise levels: comparable before and after training."""
    load(model)
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=gen)
            sigma = tr.sample_sigmas(model.model.model_sampling, latents.shape[0], gen)
            c = cond.expand(latents.shape[0], -1, -1)
            p = None if pooled is None else pooled.expand(latents.shape[0], -1)
            eps = tr.predict_noise(model, latents, noise, sigma, c, p)
            total += float(((eps - noise) ** 2).mean())
    return total / draws


def encode(host, clip, text):
    cond = host.nodes.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, text)[0]
    return cond[0][0], cond[0][1].get("pooled_output")


# ---------------------------------------------------------------------------------------------- textual inversion
@pytest.fixture(scope="module")
def ti_sd15(host, tiny_sd15, mod):
    model, clip, vae = tiny_sd15
    before = snapshot(model.model, clip.cond_stage_model, vae.first_stage_model)
    with torch.inference_mode():  # as the executor runs nodes
        path, rows, history = mod.train_textual_inversion(
            model, clip, vae, subject(), token="ti_hero", initializer_word="person", vectors=2, steps=6,
            learning_rate=2e-2, batch_size=1, resolution=RES, templates=mod.OBJECT_TEMPLATES[:4], seed=3,
            save_every=2)
    return path, rows, history, before


def test_ti_embedding_loads_through_stock_prompt_path_sd15(host, tiny_sd15, ti_sd15):
    model, clip, vae = tiny_sd15
    path, rows, history, _ = ti_sd15
    assert path.parent == host.base / "models" / "embeddings" and path.name == "ti_hero.safetensors"
    saved = safetensors.torch.load_file(str(path))
    assert list(saved) == ["clip_l"] and saved["clip_l"].shape == (2, 768)
    torch.testing.assert_close(saved["clip_l"], rows["clip_l"])
    # the stock tokenizer puts the saved rows where the word stands, and nothing else changes
    tokens = clip.tokenize("a photo of embedding:ti_hero")["l"][0]
    plain = clip.tokenize("a photo of")["l"][0]
    assert [t for t, _ in tokens[:4]] == [t for t, _ in plain[:4]]
    assert torch.equal(tokens[4][0], saved["clip_l"][0]) and torch.equal(tokens[5][0], saved["clip_l"][1])
    assert tokens[6][0] == plain[4][0]  # the end token follows
    # encoding (stock CLIPTextEncode): the prefix is exactly the plain prompt's; from the token on it differs
    with_token, _ = encode(host, clip, "a photo of embedding:ti_hero")
    without, _ = encode(host, clip, "a photo of person person")
    torch.testing.assert_close(with_token[0, :4], without[0, :4], rtol=0, atol=1e-6)
    assert (with_token[0, 4:6] - without[0, 4:6]).abs().amax() > 1e-3
    assert len(history["loss"]) == 6


def test_ti_leaves_model_clip_vae_bit_identical(tiny_sd15, ti_sd15):
    model, clip, vae = tiny_sd15
    load(model, clip.patcher)
    assert_unchanged(ti_sd15[3], model.model, clip.cond_stage_model, vae.first_stage_model)


def test_ti_checkpoints_every_k_steps_and_load(host, tiny_sd15, ti_sd15):
    _, clip, _ = tiny_sd15
    folder = host.base / "models" / "embeddings" / "storykit_checkpoints"
    names = sorted(p.name for p in folder.glob("ti_hero_s*.safetensors"))
    assert names == ["ti_hero_s000002.safetensors", "ti_hero_s000004.safetensors"]
    assert not list(folder.glob("*.part"))
    tokens = clip.tokenize("embedding:storykit_checkpoints/ti_hero_s000004")["l"][0]
    assert torch.is_tensor(tokens[1][0]) and torch.is_tensor(tokens[2][0])


def test_ti_sdxl_one_file_with_both_encoders(host, tiny_sdxl, mod):
    model, clip, vae = tiny_sdxl
    load(model, clip.patcher)
    before = snapshot(model.model, clip.cond_stage_model, vae.first_stage_model)
    init_cond, _ = encode(host, clip, "a photo of person person")
    with torch.inference_mode():
        path, rows, history = mod.train_textual_inversion(
            model, clip, vae, subject(2), token="ti_xl", initializer_word="person", vectors=2, steps=3,
            learning_rate=5e-2, batch_size=1, resolution=RES, templates=["a photo of {}"], seed=0)
    saved = safetensors.torch.load_file(str(path))
    assert saved["clip_l"].shape == (2, 768) and saved["clip_g"].shape == (2, 1280)
    tokens = clip.tokenize("a photo of embedding:ti_xl")
    assert torch.equal(tokens["l"][0][4][0], saved["clip_l"][0])
    assert torch.equal(tokens["g"][0][5][0], saved["clip_g"][1])
    cond, pooled = encode(host, clip, "a photo of embedding:ti_xl")
    assert cond.shape[-1] == 2048 and pooled.shape[-1] == 1280
    torch.testing.assert_close(cond[0, :4], init_cond[0, :4], rtol=0, atol=1e-6)
    assert (cond[0, 4:6, :768] - init_cond[0, 4:6, :768]).abs().amax() > 1e-4  # CLIP-L rows trained
    assert (cond[0, 4:6, 768:] - init_cond[0, 4:6, 768:]).abs().amax() > 1e-4  # CLIP-G rows trained
    assert_unchanged(before, model.model, clip.cond_stage_model, vae.first_stage_model)


def test_cancel_keeps_checkpoint_resume_matches_and_never_overwrites(host, tiny_sd15, mod, cancel_at_progress):
    import comfy.model_management
    import comfy.utils
    model, clip, vae = tiny_sd15
    args = dict(initializer_word="cat", vectors=1, steps=4, learning_rate=1e-2, batch_size=1, resolution=RES,
                templates=["a photo of a {}", "a {} toy"], seed=5)
    with torch.inference_mode():
        _, straight, straight_history = mod.train_textual_inversion(model, clip, vae, subject(2), token="ti_ref",
                                                                     **args)

    folder = host.base / "models" / "embeddings"
    cancel_at_progress(2)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            mod.train_textual_inversion(model, clip, vae, subject(2), token="ti_cancel", **args)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)  # the fixture puts the session's hook back at the end
        comfy.model_management.interrupt_current_processing(False)
    ckpt = folder / "storykit_checkpoints" / "ti_cancel_s000002.safetensors"
    assert ckpt.is_file() and not (folder / "ti_cancel.safetensors").exists()
    tokens = clip.tokenize("a embedding:storykit_checkpoints/ti_cancel_s000002")["l"][0]
    assert torch.is_tensor(tokens[2][0])  # loadable through the stock embedding path
    first_bytes = ckpt.read_bytes()

    # a second run with the same name picks a fresh stem, resumes and finishes like the uninterrupted run
    with torch.inference_mode():
        path, resumed, history = mod.train_textual_inversion(model, clip, vae, subject(2), token="ti_cancel",
                                                             resume_from=ckpt.name, **args)
    assert path.name == "ti_cancel_00002.safetensors"
    assert ckpt.read_bytes() == first_bytes
    assert history["loss"] == pytest.approx(straight_history["loss"], rel=1e-5)
    torch.testing.assert_close(resumed["clip_l"], straight["clip_l"], rtol=1e-5, atol=1e-6)
    # and a third run without resume does not touch the second's final file
    stamp = path.read_bytes()
    with torch.inference_mode():
        third, _, _ = mod.train_textual_inversion(model, clip, vae, subject(2), token="ti_cancel",
                                                  **{**args, "steps": 1})
    assert third.name == "ti_cancel_00003.safetensors" and path.read_bytes() == stamp


# ---------------------------------------------------------------------------------------------- dreambooth
@pytest.fixture(scope="module")
def db_lora(host, tiny_sd15, mod, tr):
    """A short LoRA run with everything on: prior preservation, text-encoder LoRA, gradient checkpointing."""
    model, clip, vae = tiny_sd15
    load(model, clip.patcher)
    before = snapshot(model.model, clip.cond_stage_model, vae.first_stage_model)
    with torch.inference_mode():
        class_latents = mod.class_prior_latents(model, clip, "a person", 2, RES, seed=0, sample_steps=2, cfg=5.0)
        cached = mod.class_prior_latents(model, clip, "a person", 2, RES, seed=0, sample_steps=2, cfg=5.0)
        out_model, out_clip, path, history = mod.train_dreambooth(
            model, clip, vae, subject(), identifier="sks", class_noun="person", prior_preservation=True,
            prior_weight=0.5, class_latents=class_latents, mode="LoRA", rank=4, alpha=4.0, train_text_encoder=True,
            learning_rate=3e-2, text_encoder_lr=1e-2, steps=3, batch_size=1, resolution=RES,
            gradient_checkpointing=True, seed=0, name="db_hero", save_every=2)
    return dict(out_model=out_model, out_clip=out_clip, path=path, history=history, before=before,
                class_latents=class_latents, cached=cached)


def test_dreambooth_logs_instance_and_prior_terms(host, db_lora):
    h = db_lora["history"]
    assert len(h["loss"]) == len(h["instance"]) == len(h["prior"]) == 3
    for total, inst, prior in zip(h["loss"], h["instance"], h["prior"], strict=True):
        assert total == pytest.approx(inst + 0.5 * prior, rel=1e-5)
    ckpt = host.base / "models" / "loras" / "storykit_checkpoints" / "db_hero_s000002.safetensors"
    assert ckpt.is_file() and (ckpt.with_suffix(".trainstate")).is_file()


def test_dreambooth_resume_from_checkpoint_finishes_like_the_straight_run(host, tiny_sd15, db_lora, mod):
    model, clip, vae = tiny_sd15
    with torch.inference_mode():
        _, _, path, history = mod.train_dreambooth(
            model, clip, vae, subject(), identifier="sks", class_noun="person", prior_preservation=True,
            prior_weight=0.5, class_latents=db_lora["class_latents"], mode="LoRA", rank=4, alpha=4.0,
            train_text_encoder=True, learning_rate=3e-2, text_encoder_lr=1e-2, steps=3, batch_size=1,
            resolution=RES, gradient_checkpointing=True, seed=0, name="db_hero", resume_from="db_hero_s000002")
    assert path.name == "db_hero_00002.safetensors"  # the first run's file is left alone
    assert history["loss"][:2] == db_lora["history"]["loss"][:2] and len(history["loss"]) == 3
    resumed, straight = (safetensors.torch.load_file(str(f)) for f in (path, db_lora["path"]))
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_dreambooth_cancel_saves_the_step_it_holds_and_resumes_exactly(host, tiny_sd15, db_lora, mod,
                                                                       cancel_at_progress):
    """Cancel during step 2 (the host's hook raises in the update after it): the checkpoint says 2 and holds 2."""
    import comfy.model_management
    import comfy.utils
    model, clip, vae = tiny_sd15
    args = dict(identifier="sks", class_noun="person", prior_preservation=True, prior_weight=0.5,
                class_latents=db_lora["class_latents"], mode="LoRA", rank=4, alpha=4.0, train_text_encoder=True,
                learning_rate=3e-2, text_encoder_lr=1e-2, steps=3, batch_size=1, resolution=RES,
                gradient_checkpointing=True, seed=0)
    cancel_at_progress(2)
    with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
        mod.train_dreambooth(model, clip, vae, subject(), name="db_cancel", **args)
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)
    folder = host.base / "models" / "loras"
    assert sorted(p.name for p in (folder / "storykit_checkpoints").glob("db_cancel_s*.safetensors")) == \
        ["db_cancel_s000002.safetensors"]
    with torch.inference_mode():
        _, _, path, history = mod.train_dreambooth(model, clip, vae, subject(), name="db_cancel",
                                                   resume_from="db_cancel_s000002", **args)
    assert history["loss"] == pytest.approx(db_lora["history"]["loss"], rel=1e-5)
    resumed, straight = (safetensors.torch.load_file(str(f)) for f in (path, db_lora["path"]))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_dreambooth_frozen_inputs_unchanged_and_class_images_cached(tiny_sd15, db_lora):
    model, clip, vae = tiny_sd15
    load(model, clip.patcher)
    assert_unchanged(db_lora["before"], model.model, clip.cond_stage_model, vae.first_stage_model)
    assert db_lora["class_latents"].shape == (2, 4, RES // 8, RES // 8)
    assert torch.equal(db_lora["cached"], db_lora["class_latents"])


def test_saved_lora_through_stock_loader_reproduces_trained_model(host, tiny_sd15, db_lora, mod, tr):
    model, clip, vae = tiny_sd15
    path = db_lora["path"]
    assert path.parent == host.base / "models" / "loras"
    saved = safetensors.torch.load_file(str(path))
    assert any(k.startswith("diffusion_model.") and k.endswith(".lora_up.weight") for k in saved)
    assert any(k.startswith("text_encoders.clip_l.") for k in saved)
    loaded_model, loaded_clip = host.nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, clip, path.name,
                                                                                          1.0, 1.0)
    latents = tr.encode_latents(model, tiny_sd15[2], subject(1), RES, flips=False)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        cond, pooled = encode(host, loaded_clip, "a sks person")
        load(loaded_model)
        stock = tr.predict_noise(loaded_model, latents, noise, sigma, cond, pooled)
        # the node's own output MODEL/CLIP
        cond_o, pooled_o = encode(host, db_lora["out_clip"], "a sks person")
        load(db_lora["out_model"])
        node_out = tr.predict_noise(db_lora["out_model"], latents, noise, sigma, cond_o, pooled_o)
        # the training-time forward: the same LoRA as hooks beside the frozen layers
        load(model, clip.patcher)
        loras = {**mod._attach_lora(model.model.diffusion_model, "diffusion_model.", mod.LORA_TARGETS, 4, 4.0,
                                    torch.Generator()),
                 **mod._attach_lora(clip.cond_stage_model, "text_encoders.", mod.TEXT_LORA_TARGETS, 4, 4.0,
                                    torch.Generator())}
        mod._load_loras("test", path, loras)
        handles = [m.target.register_forward_hook(m.hook) for m in loras.values()]
        try:
            trained = tr.predict_noise(model, latents, noise, sigma, *encode(host, clip, "a sks person"))
        finally:
            for h in handles:
                h.remove()
        plain = tr.predict_noise(model, latents, noise, sigma, *encode(host, clip, "a sks person"))
    torch.testing.assert_close(stock, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(node_out, trained, rtol=1e-4, atol=1e-5)
    assert (stock - plain).abs().amax() > 1e-4  # and the LoRA does change the output
    # LoraLoaderModelOnly reads the same file (its text-encoder keys are simply not applied)
    only = host.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(model, path.name, 1.0)[0]
    assert len(only.patches) == len([k for k in saved if k.startswith("diffusion_model.") and k.endswith(".alpha")])


def test_full_finetune_lowers_loss_and_saves_checkpoint(host, tiny_sd15, mod, tr):
    """A full fine-tune on a tiny synthetic subject lowers the denoising loss on fixed noises, and the checkpoint
    it writes has the host's own save layout (model.state_dict_for_saving, what comfy.sd.save_checkpoint writes).

    The stock CheckpointLoaderSimple cannot detect the tiny UNet's architecture (it recognises real SD1.5/SDXL
    widths only), so the file is read with the host's loader function and compared key by key and weight by weight.
    """
    import comfy.utils
    model, clip, vae = tiny_sd15
    load(model, clip.patcher)
    before = snapshot(model.model)
    latents = tr.encode_latents(model, vae, subject(), RES, flips=False)
    cond, pooled = encode(host, clip, "a sks person")
    loss_before = fixed_eval_loss(tr, model, latents, cond, pooled)
    with torch.inference_mode():
        out_model, out_clip, path, history = mod.train_dreambooth(
            model, clip, vae, subject(), identifier="sks", class_noun="person", prior_preservation=False,
            prior_weight=1.0, class_latents=None, mode="full fine-tune", rank=4, alpha=4.0,
            train_text_encoder=False, learning_rate=2e-3, text_encoder_lr=1e-4, steps=10, batch_size=1,
            resolution=RES, gradient_checkpointing=False, seed=0, name="db_full", flips=False)
    loss_after = fixed_eval_loss(tr, out_model, latents, cond, pooled)
    assert loss_after < 0.98 * loss_before, (loss_before, loss_after)
    assert path.parent == host.base / "models" / "checkpoints"
    sd = comfy.utils.load_torch_file(str(path))
    layout = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    assert sd.keys() == layout.keys()
    load(out_model)
    changed = 0
    for name, weight in out_model.model.diffusion_model.state_dict().items():
        torch.testing.assert_close(sd[f"model.diffusion_model.{name}"], weight)
        changed += not torch.equal(weight, before[0][f"diffusion_model.{name}"])
    assert changed > 10  # a full fine-tune moves every layer, not a few
    load(model)
    assert_unchanged(before, model.model)


def test_rare_identifiers_are_single_short_tokens(host, node_class, tiny_sdxl):
    _, clip, _ = tiny_sdxl
    ident, listed = node_class("StoryKitRareIdentifiers").execute(clip, 3, 3).args
    words = listed.split(", ")
    assert ident == words[0] and len(words) == 3
    for word in words:
        assert len(word) == 3 and word.isalpha()
        for key in ("l", "g"):
            toks = [t for t, _ in clip.tokenize(word)[key][0]]
            assert len([t for t in toks if t not in (49406, 49407, 0)]) == 1, word


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../../../../etc/hostname", "no_such_checkpoint",
                                  "storykit_checkpoints/../../loras"])
def test_resume_from_stays_in_the_model_folders_with_one_message(host, tr, name):
    """A file outside the folder and a missing one get the same answer (the input reveals nothing of the machine)."""
    folder = host.base / "models" / "embeddings"
    with pytest.raises(ValueError, match=r"Train TI: resume_from .* is not a readable checkpoint in .*give the file "
                                         r"name of a checkpoint there"):
        tr.resolve_resume(folder, name, "Train TI")


def test_damaged_resume_checkpoint_names_node_input_and_file(host, tr):
    folder = host.base / "models" / "embeddings" / "storykit_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken_s000002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    path = tr.resolve_resume(folder.parent, "broken_s000002", "Train TI")
    for read in (lambda: tr.read_checkpoint(path, "Train TI"), lambda: tr.checkpoint_step(path, "Train TI")):
        with pytest.raises(ValueError, match=r"Train TI: resume_from broken_s000002\.safetensors "):
            read()
