"""The pack's node list: every `nodes_*.py` module here exports `NODES`, a list of io.ComfyNode classes."""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil

from .v3 import ComfyExtension, io

log = logging.getLogger("storykit")


ISOLATION_MESSAGE = (
    "StoryKit needs ComfyUI's in-process custom nodes, and {why}. Its Consistent Self-Attention and "
    "One-Prompt-One-Story nodes clone the MODEL and patch its self-attention (ModelPatcher.set_model_attn1_patch, "
    "attn1 replaces, sampler wrappers); under process isolation a pack gets a proxy of the model whose SDK offers no "
    "self-attention hook, so nothing StoryKit does could reach the U-Net. Start ComfyUI without "
    "--use-process-isolation to use StoryKit (it ships no pyisolate.yaml and asks for no isolated child).")


def process_isolation() -> str | None:
    """Why this host runs custom nodes out of process (newer hosts' --use-process-isolation), or None.

    Read in Comfy-Org/ComfyUI's isolation code: the parent sets args.use_process_isolation (older branches
    PYISOLATE_ISOLATION_ACTIVE=1) and wraps every loaded MODEL in a ModelPatcherProxy; a pack's child process runs
    with PYISOLATE_CHILD=1.
    """
    if os.environ.get("PYISOLATE_CHILD") == "1":
        return "it was loaded in a process-isolation child (PYISOLATE_CHILD=1)"
    if os.environ.get("PYISOLATE_ISOLATION_ACTIVE") == "1":
        return "this ComfyUI runs with process isolation (PYISOLATE_ISOLATION_ACTIVE=1)"
    try:
        from comfy.cli_args import args
    except ImportError:
        return None
    if getattr(args, "use_process_isolation", False):
        return "this ComfyUI was started with --use-process-isolation"
    return None


def check_host_mode() -> None:
    """Stop loading with a clear message where the host's mode leaves StoryKit nothing to patch."""
    why = process_isolation()
    if why is not None:
        raise RuntimeError(ISOLATION_MESSAGE.format(why=why))


def node_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("nodes_"))


def load_nodes(strict: bool = False) -> list[type[io.ComfyNode]]:
    """Import each node module; one that fails is logged and skipped so the rest of the pack still loads."""
    found: list[type[io.ComfyNode]] = []
    for name in node_modules():
        try:
            module = importlib.import_module(f".{name}", __name__)
        except Exception:
            if strict:
                raise
            log.exception("StoryKit: %s failed to import; its nodes are unavailable", name)
            continue
        found.extend(getattr(module, "NODES", []))
    return found


class StoryKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        try:
            from . import story_routes
            story_routes.register()
        except Exception:  # the preview is a convenience: the nodes work without it
            log.exception("StoryKit: the story preview route could not be added")
        return load_nodes()
