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
