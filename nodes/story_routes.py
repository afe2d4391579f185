"""The server route behind the Story Prompt node's live preview (web/story_prompt.js): the same parser as the node.

POST /storykit/story/preview {story, references_per_character, reference_mode} ->
    {"ok": true, "characters": [...], "frames": [{"line", "characters", "caption", "reference"}], "notes": [...]}
    or {"ok": false, "error": "line 4: the frame names [Bob], who has no character line. ..."}
"""
from __future__ import annotations

import logging

from ..kernels import story_plan

log = logging.getLogger("storykit")
ROUTE = "/storykit/story/preview"


def preview(body: dict) -> dict:
    try:
        refs = int(body.get("references_per_character", 2))
        plan = story_plan.parse_story(str(body.get("story", "")), "", refs, str(body.get("reference_mode", "auto")))
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {
        "ok": True,
        "characters": [{"name": name, "description": text} for name, text in plan.characters.items()],
        "frames": [{"line": f.line, "characters": list(f.characters), "caption": f.caption, "reference": f.reference}
                   for f in plan.frames],
        "notes": list(plan.notes),
    }


def register() -> bool:
    """Add the route when a PromptServer is running (not in the headless runner); safe to call more than once."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, "_storykit_routes", False):
        return False

    @server.routes.post(ROUTE)
    async def story_preview(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"ok": False, "error": "the request body is not JSON"}, status=400)
        return web.json_response(preview(body if isinstance(body, dict) else {}))

    server._storykit_routes = True
    return True
