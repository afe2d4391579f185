"""The DiT story workflows run headless on their tiny models through the real executor: the template's loaders,
Story Prompt -> Consistent Self-Attention -> Story Sampler on a flow model, frames and a comic page."""
import pytest

WORKFLOWS = [("storykit_csa_flux.json", "flux"), ("storykit_csa_flux2.json", "flux2"),
             ("storykit_csa_qwen_image.json", "qwen_image"), ("storykit_csa_z_image.json", "z_image")]


@pytest.mark.parametrize("name,kind", WORKFLOWS)
def test_dit_story_workflow_runs_headless_with_a_bank(run_workflow, host, name, kind, monkeypatch):
    from storykit.nodes import csa_patch
    from storykit.runner.host import PACK_DIR
    path = PACK_DIR / "workflows" / name
    import sys
    written = []
    # the host loads the pack under its own module name: count bank writes in every copy of the module
    for module in {m for n, m in sys.modules.items() if n.endswith("nodes.csa_patch")} | {csa_patch}:
        real = module.ConsistentSelfAttention.capture

        def counting(self, call, tokens, real=real):
            before = self.bank.nbytes()
            real(self, call, tokens)
            written.append(self.bank.nbytes() - before)
        monkeypatch.setattr(module.ConsistentSelfAttention, "capture", counting)
    latent = "EmptyFlux2LatentImage" if kind == "flux2" else "EmptySD3LatentImage"
    overrides = [f"{latent}.width=64", f"{latent}.height=64", "StoryKitStorySampler.steps=2"]
    if kind == "flux2":  # the template's Flux2Scheduler feeds the Story Sampler's sigmas (its steps win)
        overrides += ["Flux2Scheduler.steps=2", "Flux2Scheduler.width=64", "Flux2Scheduler.height=64"]
    res = run_workflow(path, tiny_model=kind, overrides=overrides)
    images = [i for out in res.outputs.values() for i in (out.get("images") or [])]
    assert len(images) == 5 + 1, res.outputs  # five frames and the comic page
    assert sum(written) > 0, "the reference frames wrote no bank"
