"""The One-Prompt-One-Story example workflows run headless on the tiny models through the real executor."""
import pytest


@pytest.mark.parametrize("name,kind,overrides", [
    ("storykit_1p1s_sd15.json", "sd15", ["5.width=64", "5.height=64", "7.steps=2"]),
    ("storykit_1p1s_sdxl.json", "sdxl", ["5.width=64", "5.height=64", "9.steps=2"]),
])
def test_example_workflow_runs_headless(run_workflow, host, name, kind, overrides):
    from storykit.runner.host import PACK_DIR
    res = run_workflow(PACK_DIR / "workflows" / name, tiny_model=kind, overrides=overrides)
    images = [i for out in res.outputs.values() for i in (out.get("images") or [])]
    assert len(images) == 4, res.outputs      # one picture per frame line
    assert {"2", "3"} <= {str(n) for n in res.ran}


def test_flux_workflow_runs_headless_with_ipca_on_joint_attention(run_workflow, host, monkeypatch):
    """FLUX.1 dev graph (UNETLoader, DualCLIPLoader flux, FluxGuidance, KSampler cfg 1) on the tiny FLUX model:
    four frames, IPCA's exact path on every block (P0 alone rides as extra text rows)."""
    import importlib
    import sys

    from storykit.runner.host import PACK_DIR
    calls = []
    # the host loads the pack under its own module name: patch the IPCA module of every loaded copy of the pack
    packages = {m.__package__ for n, m in list(sys.modules.items()) if n.endswith("nodes.nodes_one_prompt_story")}
    for module in {importlib.import_module(p + ".ipca_patch") for p in packages}:
        real = module.JointIPCA.attend

        def counting(self, call, q, k, v, attend, real=real):
            calls.append((self.exact, self.context_len, call.block))
            return real(self, call, q, k, v, attend)
        monkeypatch.setattr(module.JointIPCA, "attend", counting)
    res = run_workflow(PACK_DIR / "workflows" / "storykit_1p1s_flux.json", tiny_model="flux",
                       overrides=["8.width=64", "8.height=64", "10.steps=2"])
    images = [i for out in res.outputs.values() for i in (out.get("images") or [])]
    assert len(images) == 4, res.outputs
    assert {"4", "5", "9"} <= {str(n) for n in res.ran}
    assert calls and all(exact and n == 256 for exact, n, _ in calls)     # T5's 256 rows + P0 alone appended
    assert {block[0] for *_, block in calls} == {"double", "single"}
