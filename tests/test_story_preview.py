"""The Story Prompt preview's server side: the node's own parser, as JSON the front-end extension renders."""
import importlib


def test_preview_lists_characters_frames_and_references(host):
    routes = importlib.import_module("storykit.nodes.story_routes")
    story = ("[Mia] a woman with red hair\n[Otto] an old man\n[Mia] wakes up # Monday.\n[Mia] runs\n"
             "[Otto] reads\n[Otto] sleeps\n[Mia] and [Otto] meet # They meet.\n[NC] an empty street")
    out = routes.preview({"story": story, "references_per_character": 2, "reference_mode": "auto"})
    assert out["ok"]
    assert [c["name"] for c in out["characters"]] == ["Mia", "Otto"]
    assert [f["characters"] for f in out["frames"]] == [["Mia"], ["Mia"], ["Otto"], ["Otto"], ["Mia", "Otto"], []]
    assert [f["reference"] for f in out["frames"]] == [True, True, True, True, False, False]
    assert out["frames"][0]["caption"] == "Monday." and out["frames"][0]["line"] == 3


def test_preview_reports_the_parsers_error(host):
    routes = importlib.import_module("storykit.nodes.story_routes")
    out = routes.preview({"story": "[Mia] a woman\n[Mia] waves\n[Bob] runs", "references_per_character": 1})
    assert not out["ok"] and "[Bob]" in out["error"] and "line 3" in out["error"]
    assert not routes.preview({"story": "x", "references_per_character": "two"})["ok"]


def _serve(routes_mod, scenario):
    """Run scenario(session, url) against an aiohttp app holding the preview route and a /ping route (a stand-in
    for the server's other routes, e.g. /system_stats), on a loopback port."""
    import asyncio

    from aiohttp import ClientSession, web

    async def main():
        table = web.RouteTableDef()
        routes_mod.add_route(table)

        @table.get("/ping")
        async def ping(request):
            return web.json_response({"pong": True})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(table)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with ClientSession() as session:
                return await scenario(session, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_bad_bodies_answer_400_or_413_with_a_message(host):
    routes = importlib.import_module("storykit.nodes.story_routes")
    bodies = {
        "infinity": (b'{"story": "[A] a\\n[A] b", "references_per_character": Infinity}', 400, "not a number"),
        "overflow": (b'{"story": "[A] a\\n[A] b", "references_per_character": 1e400}', 400, "out of range"),
        "nested": (b'{"story": ' + b"[" * 200000 + b"]" * 200000 + b"}", 400, "nested too deeply"),
        "not json": (b"story=1", 400, "not valid JSON"),
        "too big": (b'{"story": "' + b"x" * (routes.MAX_BODY_BYTES + 10) + b'"}', 413, "at most"),
        "too many lines": (('{"story": "' + "[A] a" + "\\n[A] b" * (routes.MAX_LINES + 1) + '"}').encode(), 413,
                           "at most"),
        "not a story": (b'{"story": ["x"]}', 200, "must be text"),
    }

    async def scenario(session, url):
        out = {}
        for name, (raw, _, _) in bodies.items():
            async with session.post(url + routes.ROUTE, data=raw,
                                    headers={"Content-Type": "application/json"}) as r:
                out[name] = (r.status, await r.json())
        return out

    answers = _serve(routes, scenario)
    for name, (_, status, words) in bodies.items():
        got_status, body = answers[name]
        assert got_status == status and not body["ok"] and words in body["error"], (name, got_status, body)
        assert body["error"].startswith("StoryKit Story Prompt"), name


def test_other_requests_are_answered_while_a_story_is_parsed(host, monkeypatch):
    """The parse holds until a /ping has been answered: on the event loop that could never happen (the old route
    blocked every request for the 32 s a 410 KB story took)."""
    import threading

    routes = importlib.import_module("storykit.nodes.story_routes")
    real_parse = routes.story_plan.parse_story
    pinged = threading.Event()

    def slow_parse(*args, **kwargs):
        pinged.wait(timeout=10)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(routes.story_plan, "parse_story", slow_parse)
    story = "\n".join([f"[C{i}] person {i}" for i in range(2000)] + [f"[C{i}] walks # {i}" for i in range(2000)])

    async def scenario(session, url):
        import asyncio
        import time

        async def post():
            async with session.post(url + routes.ROUTE, json={"story": story}) as r:
                return time.perf_counter(), await r.json()

        task = asyncio.create_task(post())
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        async with session.get(url + "/ping") as r:
            assert (await r.json())["pong"]
        ping_done = time.perf_counter()
        pinged.set()
        post_done, answer = await task
        return ping_done - start, ping_done < post_done, answer

    ping_seconds, ping_first, answer = _serve(routes, scenario)
    assert ping_first and ping_seconds < 2 and answer["ok"] and len(answer["frames"]) == 2000


def test_preview_shows_places_and_each_characters_mask_source(host):
    """Places by name, and per character where its mask comes from: a Character Mask node fed by the story, a
    box (story or Identity Routing layout), or attention where a frame has several characters."""
    routes = importlib.import_module("storykit.nodes.story_routes")
    story = ("[Lena] a woman\n[Bob] a man\n[Lena] reads\n[Bob] cooks\n[Lena@left] and [Bob@0.5,0,1,1] talk\n"
             "[Lena] and [Bob] walk\n[Lena] and [Bob] sleep")
    plain = routes.preview({"story": story, "references_per_character": 1})
    assert plain["frames"][2]["place_names"] == {"Lena": "left", "Bob": "right"} and "sources" not in plain["frames"][2]
    graph = {"masks": [{"id": 7, "character": "bob", "frames": "4"}],
             "photos": [{"id": 8, "character": "Lena", "use": "photo only"}],
             "routing": [{"id": 9, "mode": "auto", "layout": "5: [Lena@top]"}]}
    out = routes.preview({"story": story, "references_per_character": 1, "graph": graph})
    assert out["ok"] and out["graph_errors"] == [] and out["photos"] == [{"character": "Lena", "use": "photo only"}]
    assert [f["sources"] for f in out["frames"]] == [
        {}, {}, {"Lena": "box", "Bob": "box"}, {"Lena": "auto (attention)", "Bob": "mask"},
        {"Lena": "box", "Bob": "auto (attention)"}]
    assert out["frames"][4]["place_names"] == {"Lena": "top"}
    assert [f["reference"] for f in out["frames"]] == [False, True, False, False, False]  # Lena reads her photo
    off = routes.preview({"story": story, "graph": {"routing": [{"id": 9, "mode": "off", "layout": ""}]},
                          "references_per_character": 1})
    assert off["routing_mode"] == "off" and all(f["sources"] == {} for f in off["frames"])


def test_preview_shows_what_the_graphs_nodes_would_refuse(host):
    routes = importlib.import_module("storykit.nodes.story_routes")
    story = "[Lena] a woman\n[Bob] a man\n[Lena] reads\n[Bob] cooks\n[Lena] and [Bob] talk"
    graph = {"masks": [{"id": 7, "character": "Zed", "frames": ""}, {"id": 3, "character": "Bob", "frames": "1"}],
             "photos": [{"id": 8, "character": "", "use": "photo only"}],
             "routing": [{"id": 9, "mode": "auto", "layout": "3: [Lena@left-ish]"}]}
    out = routes.preview({"story": story, "references_per_character": 1, "graph": graph})
    assert out["ok"], out  # the story itself is fine: the frames still show, the errors beside them
    errors = out["graph_errors"]
    assert len(errors) == 4, errors
    assert any("Identity Routing #9: layout line 1" in e and "not a place" in e for e in errors)
    assert any("Character Mask #7" in e and "'Zed'" in e and "characters: Lena, Bob" in e for e in errors)
    assert any("Character Mask #3" in e and "frame 1" in e and "does not show [Bob]" in e for e in errors)
    assert any("Character Photo #8" in e for e in errors)
    bad = routes.preview({"story": story.replace("[Lena] and", "[Lena@nowhere] and"), "graph": graph})
    assert not bad["ok"] and "nowhere" in bad["error"]  # a place error in the story: the preview's own error
