"""The pack's node list: every `nodes_*.py` module here exports `NODES`, a list of io.ComfyNode classes."""
from __future__ import annotations

import importlib
import logging
import pkgutil

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("storykit")


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
