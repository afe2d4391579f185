"""The server route behind the Story Prompt node's live preview (web/story_prompt.js): the same parser as the node.

POST /storykit/story/preview {story, references_per_character, reference_mode} ->
    {"ok": true, "characters": [...], "frames": [{"line", "characters", "caption", "reference"}], "notes": [...]}
    or {"ok": false, "error": "line 4: the frame names [Bob], who has no character line. ..."}
A body that is not JSON, holds a number JSON has no room for (Infinity, 1e400) or nests too deeply answers 400;
one over MAX_BODY_BYTES or a story over MAX_LINES lines answers 413. Parsing runs in a worker thread, so the
server's event loop (every other request) never waits for it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math

from ..kernels import story_plan

log = logging.getLogger("storykit")
ROUTE = "/storykit/story/preview"
MAX_BODY_BYTES = 512 * 1024
MAX_LINES = 5000


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _check_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise BadRequest(f"the story is {size // 1024} KB; the preview reads at most {MAX_BODY_BYTES // 1024} KB "
                         "(shorten it, or queue the prompt: the node reads any length)", 413)


def read_body(raw: bytes) -> dict:
    """The request body as a dict, or BadRequest with a message the preview shows."""
    _check_size(len(raw))
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object {story, references_per_character, reference_mode}")
    return body


def preview(body: dict) -> dict:
    story = body.get("story", "")
    if not isinstance(story, str):
        return {"ok": False, "error": "StoryKit Story Prompt: the story must be text"}
    lines = story.count("\n") + 1
    if lines > MAX_LINES:
        return {"ok": False, "status": 413, "error": f"StoryKit Story Prompt: the story has {lines} lines; the "
                f"preview reads at most {MAX_LINES} (the node reads any length)"}
    try:
        refs = body.get("references_per_character", 2)
        if isinstance(refs, bool) or not isinstance(refs, (int, float, str)):
            raise TypeError("references per character must be a whole number")
        plan = story_plan.parse_story(story, "", int(refs), str(body.get("reference_mode", "auto")))
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {
        "ok": True,
        "characters": [{"name": name, "description": text} for name, text in plan.characters.items()],
        "frames": [{"line": f.line, "characters": list(f.characters), "caption": f.caption, "reference": f.reference,
                    "places": {name: list(box) for name, box in f.places}}
                   for f in plan.frames],
        "notes": list(plan.notes),
    }


def add_route(routes) -> None:
    """Add the preview handler to an aiohttp RouteTableDef (the PromptServer's, or a test app's)."""
    from aiohttp import web

    @routes.post(ROUTE)
    async def story_preview(request):
        try:
            _check_size(request.content_length or 0)
            body = read_body(await request.read())
        except BadRequest as exc:
            return web.json_response({"ok": False, "error": f"StoryKit Story Prompt: {exc}"}, status=exc.status)
        out = await asyncio.get_running_loop().run_in_executor(None, preview, body)
        return web.json_response(out, status=out.pop("status", 200))


def register() -> bool:
    """Add the route when a PromptServer is running (not in the headless runner); safe to call more than once."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, "_storykit_routes", False):
        return False
    add_route(server.routes)
    server._storykit_routes = True
    return True
