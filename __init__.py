"""StoryKit: consistent characters across the pictures of a story, as native ComfyUI nodes.

ComfyUI imports this file and calls `comfy_entrypoint`; the node modules are imported only then, so the pack's
command-line runner (`python -m storykit`) can import this package before it has found a ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import StoryKitExtension, check_host_mode
    check_host_mode()  # process isolation: fail here with the reason, not later in a patch
    return StoryKitExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
