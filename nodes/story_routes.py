"""The server route behind the Story Prompt node's live preview (web/story_prompt.js): the same parser as the node.

POST /storykit/story/preview {story, references_per_character, reference_mode, graph?} ->
    {"ok": true, "characters": [...], "frames": [{"line", "characters", "caption", "reference", "places",
    "place_names"}], "notes": [...]}  (places: name -> [x0, y0, x1, y1]; place_names: name -> "left" or "0.5,0,1,1")
    or {"ok": false, "error": "line 4: the frame names [Bob], who has no character line. ..."}
`graph` (optional) is what the front end found downstream of the node's story output: {"masks": [{"id",
"character", "frames"}], "photos": [{"id", "character", "use"}], "routing": [{"id", "mode", "layout"}]}; then each
frame also gets "sources" (name -> "mask", "box", "auto (attention)"; absent: plain sharing), the answer
"photos" ([{"character", "use"}]; frames of photo-only characters are then no references) and "graph_errors" (what those nodes will refuse, with the node's number).
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


def place_name(box) -> str:
    """A layout box as the story would write it: its named place, else its fractions."""
    named = next((name for name, named_box in story_plan.BOXES.items() if tuple(named_box) == tuple(box)), None)
    return named or ",".join(f"{v:g}" for v in box)


def _items(graph: dict, key: str) -> list[dict]:
    items = graph.get(key) if isinstance(graph, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _text(item: dict, key: str) -> str:
    value = item.get(key, "")
    return value if isinstance(value, str) else str(value)


def graph_sources(plan: story_plan.StoryPlan, graph: dict) -> dict:
    """Each frame's mask source per character, the photos and the errors of the Character Mask / Character Photo /
    Identity Routing nodes fed by this story, read with those nodes' own parsers (as routing.prepare decides)."""
    from .nodes_identity import MASK_NODE, PHOTO_NODE, ROUTING_NODE
    from .routing import MODES, check_character
    errors, masked, photos, places, mode = [], set(), [], {}, "auto"
    for item in _items(graph, "routing"):
        where = f"{ROUTING_NODE} #{item.get('id', '?')}"
        mode = _text(item, "mode") if _text(item, "mode") in MODES else mode
        try:
            places.update({(i, name): box for i, name, box in story_plan.parse_layout(_text(item, "layout"), plan,
                                                                                        where)})
        except ValueError as error:
            errors.append(str(error))
    for item in _items(graph, "masks"):
        where = f"{MASK_NODE} #{item.get('id', '?')}"
        try:
            name = check_character(plan, _text(item, "character"), where)
            indices = story_plan.parse_frames(_text(item, "frames"), plan, f"{where}: frames")
            for index in indices:
                if name not in plan.frames[index].characters:
                    raise ValueError(f"{where}: frames: frame {index + 1} (story line {plan.frames[index].line}) "
                                     f"does not show [{name}]; list only frames with [{name}]")
            masked.update((i, name) for i in indices or [f.index for f in plan.frames if name in f.characters])
        except ValueError as error:
            errors.append(str(error))
    for item in _items(graph, "photos"):
        try:
            name = check_character(plan, _text(item, "character"), f"{PHOTO_NODE} #{item.get('id', '?')}")
            photos.append({"character": name, "use": _text(item, "use")})
        except ValueError as error:
            errors.append(str(error))
    places.update({(f.index, name): box for f in plan.frames for name, box in f.places})
    frames = []
    for f in plan.frames:
        sources = {}
        for name in f.characters if mode != "off" else ():
            if (f.index, name) in masked:
                sources[name] = "mask"
            elif (f.index, name) in places:
                sources[name] = "box"
            elif mode == "every frame" or len(f.characters) > 1:
                sources[name] = "auto (attention)"
        frames.append({"sources": sources,
                       "place_names": {n: place_name(box) for (i, n), box in places.items() if i == f.index}})
    return {"frames": frames, "photos": photos, "errors": errors, "mode": mode}


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
    out = {
        "ok": True,
        "characters": [{"name": name, "description": text} for name, text in plan.characters.items()],
        "frames": [{"line": f.line, "characters": list(f.characters), "caption": f.caption, "reference": f.reference,
                    "places": {name: list(box) for name, box in f.places},
                    "place_names": {name: place_name(box) for name, box in f.places}}
                   for f in plan.frames],
        "notes": list(plan.notes),
    }
    if isinstance(body.get("graph"), dict):
        found = graph_sources(plan, body["graph"])
        only = {p["character"] for p in found["photos"] if p["use"] == "photo only"}
        for frame, extra in zip(out["frames"], found["frames"], strict=True):
            frame["sources"] = extra["sources"]
            frame["place_names"] = {**extra["place_names"], **frame["place_names"]}
            if frame["characters"] and set(frame["characters"]) <= only:  # they read the photo, none writes
                frame["reference"] = False
        out.update(photos=found["photos"], graph_errors=found["errors"], routing_mode=found["mode"])
    return out


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
