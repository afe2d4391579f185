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
