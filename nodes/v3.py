"""The host's V3 node API, pinned: every node module takes `io` and `ComfyExtension` from here.

`comfy_api.latest` is the moving target (newer hosts mark it unstable and rebuild it from `_io_public`). The
versioned adapters are the pinned surface: `comfy_api.v0_0_2` re-exports `io`, `ui` and `ComfyExtension` in every
host from 0.3.64 on (read in the 0.3.64 and 0.3.75 trees and in Comfy-Org/ComfyUI's newer `comfy_api/v0_0_2`);
`v0_0_3` exists only in the newest hosts, so it is not the common pin. A host that has no versioned adapter with
`io` falls back to `latest`.
"""
from __future__ import annotations

import importlib

# Newest first among the versions the supported host range has in common; `latest` last.
API_VERSIONS = ("comfy_api.v0_0_2", "comfy_api.latest")


def _pinned():
    for name in API_VERSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "io") and hasattr(module, "ComfyExtension"):
            return name, module.io, module.ComfyExtension
    raise ImportError("StoryKit: this ComfyUI has no V3 node API (comfy_api.v0_0_2 or comfy_api.latest); "
                      "StoryKit needs ComfyUI 0.3.64 or newer")


API_MODULE, io, ComfyExtension = _pinned()

__all__ = ["API_MODULE", "ComfyExtension", "io"]
