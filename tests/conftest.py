"""Shared fixtures: the real ComfyUI host booted once per session (CPU), seeded tiny models, a workflow runner.

Tests in tests/kernels/ use none of these and run without the host.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `import storykit` must name this checkout whatever its folder is called (tools/storykit.sh sets this up too).
if importlib.util.find_spec("storykit") is None or \
        Path(importlib.util.find_spec("storykit").origin).resolve().parent != REPO:
    _links = Path(tempfile.mkdtemp(prefix="storykit-import-"))
    (_links / "storykit").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(_links))
    for _name in [m for m in sys.modules if m == "storykit" or m.startswith("storykit.")]:
        del sys.modules[_name]

os.environ.setdefault("STORYKIT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real host, with its models, input and output folders in a session temp dir."""
    from storykit.runner import host as host_mod
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("models/checkpoints", "models/loras", "models/embeddings", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    h = host_mod.boot(models_dir=base / "models", output_dir=base / "output", input_dir=base / "input", cpu=True)
    h.base = base
    return h


@pytest.fixture(scope="session")
def tiny_sd15(host):
    """(MODEL, CLIP, VAE): small SD1.5-like UNet (32 channels, 2 levels), CLIP-L width text encoder, small VAE."""
    from storykit.runner import testmodels
    return testmodels.tiny_models("sd15", 0)


@pytest.fixture(scope="session")
def tiny_sdxl(host):
    """(MODEL, CLIP, VAE): small SDXL-like UNet (2048-wide context, ADM), CLIP-L + CLIP-G with pooled output."""
    from storykit.runner import testmodels
    return testmodels.tiny_models("sdxl", 0)


@pytest.fixture(scope="session")
def random_sd15_checkpoint(host):
    """A full-size SD1.5 checkpoint with random weights, written once and kept in the StoryKit cache."""
    from storykit.runner import testmodels
    from storykit.runner.cli import cache_dir
    folder = cache_dir() / "models" / "checkpoints"
    path = testmodels.write_random_sd15_checkpoint(folder)
    host.folder_paths.add_model_folder_path("checkpoints", str(folder))
    return path


@pytest.fixture(scope="session")
def run_workflow(host):
    """run_workflow(path_or_dict, tiny_model="sd15", overrides=[...]) -> RunResult, through the CLI's own path."""
    from storykit.runner import cli, execute
    from storykit.runner import convert as conv

    def run(workflow, tiny_model: str | None = "sd15", overrides=(), quiet=True):
        data = conv.load_workflow_file(workflow) if isinstance(workflow, (str, Path)) else workflow
        prompt = conv.to_api(data, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
        if tiny_model:
            cli.substitute_tiny_models(host.nodes, prompt, tiny_model)
        conv.apply_overrides(prompt, list(overrides))
        return execute.run_prompt(host, prompt, quiet=quiet)

    return run


def storykit_node(host, node_id: str):
    """A pack node class as the host registered it (the host loads the pack under its own module name)."""
    cls = host.nodes.NODE_CLASS_MAPPINGS.get(node_id)
    if cls is None:
        raise KeyError(f"{node_id} is not registered; StoryKit nodes: "
                       + ", ".join(sorted(k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("StoryKit"))))
    return cls


@pytest.fixture(scope="session")
def node_class(host):
    return lambda node_id: storykit_node(host, node_id)


@pytest.fixture()
def cancel_at_progress(host):
    """cancel_at_progress(k): Cancel pressed while step k runs, with the host's own progress hook (main.py's hook
    calls throw_exception_if_processing_interrupted first), so the interrupt raises inside the update after step k."""
    import comfy.model_management as mm
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def install(k: int):
        def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
            if value == k:
                mm.interrupt_current_processing(True)  # the Cancel button, during step k
            mm.throw_exception_if_processing_interrupted()
        comfy.utils.set_progress_bar_global_hook(hook)

    yield install
    comfy.utils.set_progress_bar_global_hook(previous)
    mm.interrupt_current_processing(False)
