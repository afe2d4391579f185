"""runner/convert.py against the real ComfyUI front end: tests/data/frontend holds workflows the front end 1.32.9 saved
and exported together with the prompt it queued for them, and tests/data/frontend/1.58 the same graphs (and more)
from front end 1.58.1 (made by tools/frontend/make_fixtures.mjs). Converting the saved file must give the front
end's own prompt, and that prompt must run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from storykit.runner import convert as conv

DATA = Path(__file__).parent / "data" / "frontend"
NEWER = "1.58"  # front end 1.58.1's fixtures, in DATA / NEWER; names there are "1.58/<graph>"
FIXTURES = sorted(p.name[: -len(".api.json")] for p in DATA.glob("*.api.json")) + \
    sorted(f"{NEWER}/{p.name[: -len('.api.json')]}" for p in (DATA / NEWER).glob("*.api.json"))
SAVED_FORMS = ("workflow", "export")  # Save menu / Export and PNG-embedded


def load(name: str, kind: str) -> dict:
    return json.loads((DATA / f"{name}.{kind}.json").read_text(encoding="utf-8"))


def runnable(name: str) -> bool:
    """A KSampler pipeline the tiny SD1.5 model can run (1.58's default graph loads a video model; the story graph
    is the shipped workflow, run by test_runner_cli)."""
    prompt = load(name, "api")
    return {"KSampler", "EmptyLatentImage"} <= {e["class_type"] for e in prompt.values()}


def differences(front_end: dict, ours: dict) -> list[str]:
    """Every node and input where the converter's prompt and the front end's disagree (titles only when we set one)."""
    out = []
    for node_id in sorted(set(front_end) | set(ours)):
        want, got = front_end.get(node_id), ours.get(node_id)
        if want is None or got is None:
            out.append(f"node {node_id}: only in {'the converter' if want is None else 'the front end'}'s prompt")
            continue
        if want["class_type"] != got["class_type"]:
            out.append(f"node {node_id}: class_type {want['class_type']!r} != {got['class_type']!r}")
        for name in sorted(set(want["inputs"]) | set(got["inputs"])):
            a, b = want["inputs"].get(name, "<absent>"), got["inputs"].get(name, "<absent>")
            if a != b:
                out.append(f"node {node_id} ({want['class_type']}).{name}: front end {a!r}, converter {b!r}")
        title = (got.get("_meta") or {}).get("title")
        if title is not None and title != want["_meta"]["title"]:
            out.append(f"node {node_id}: title {want['_meta']['title']!r} != {title!r}")
    return out


def test_every_fixture_is_complete():
    assert len(FIXTURES) >= 8, FIXTURES
    assert len([n for n in FIXTURES if n.startswith(NEWER + "/")]) >= 10, FIXTURES
    for name in FIXTURES:
        for kind in SAVED_FORMS:
            data = load(name, kind)
            assert data["nodes"] and "links" in data, (name, kind)


@pytest.mark.parametrize("kind", SAVED_FORMS)
@pytest.mark.parametrize("name", FIXTURES)
def test_converter_matches_front_end(host, name, kind):
    ours = conv.to_api(load(name, kind), conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    assert differences(load(name, "api"), ours) == []


def test_muted_and_bypassed_nodes_leave_the_prompt(host):
    """The fixture really has what it is named for, so the comparison above is not vacuous."""
    saved = load("primitive_reroute_bypass", "workflow")
    modes = {n["type"]: n.get("mode", 0) for n in saved["nodes"]}
    assert modes["ImageInvert"] == modes["LatentUpscaleBy"] == conv.MODE_BYPASS
    assert modes["PreviewImage"] == conv.MODE_MUTED
    assert saved["extra"]["reroutes"], "the native link reroute is missing from the fixture"
    prompt = conv.to_api(saved, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    types = {e["class_type"] for e in prompt.values()}
    assert not types & {"ImageInvert", "LatentUpscaleBy", "PreviewImage", "Reroute", "PrimitiveNode"}
    sampler = next(e for e in prompt.values() if e["class_type"] == "KSampler")
    assert sampler["inputs"]["seed"] == 424242
    assert sampler["inputs"]["latent_image"][0] == next(i for i, e in prompt.items() if e["class_type"] == "EmptyLatentImage")


def test_primitive_seed_control_is_kept(host):
    converted = conv.to_api(load("primitive_reroute_bypass", "workflow"),
                            conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS))
    [control] = converted.controls
    sampler_id = next(i for i, e in converted.prompt.items() if e["class_type"] == "KSampler")
    assert (control.mode, control.targets) == ("increment", [(sampler_id, "seed")])


def test_1_58_fixtures_have_what_they_are_named_for(host):
    """Promoted widgets, nested subgraphs, bypassed and muted nodes and the Story Prompt, as 1.58 saved them."""
    promoted = load(f"{NEWER}/subgraph_promoted", "workflow")
    [instance] = [n for n in promoted["nodes"] if n["type"] == promoted["definitions"]["subgraphs"][0]["id"]]
    assert {"seed", "text"} <= set(instance["widgets_values_named"]) and 4321 in instance["widgets_values"]
    api = load(f"{NEWER}/subgraph_promoted", "api")
    assert next(e for e in api.values() if e["class_type"] == "KSampler")["inputs"]["seed"] == 4321
    nested = load(f"{NEWER}/subgraph_nested", "api")
    assert any(i.count(":") == 2 for i in nested), sorted(nested)
    modes = {n["type"]: n.get("mode", 0) for n in load(f"{NEWER}/primitive_reroute_bypass", "workflow")["nodes"]}
    assert modes["ImageInvert"] == conv.MODE_BYPASS and modes["PreviewImage"] == conv.MODE_MUTED
    story = load(f"{NEWER}/story_prompt", "api")
    assert any(e["class_type"] == "StoryKitStoryPrompt" for e in story.values())
    routed = load(f"{NEWER}/two_characters", "api")
    sampler = next(i for i, e in routed.items() if e["class_type"] == "StoryKitStorySampler")
    overlay = next(e for e in routed.values() if e["class_type"] == "StoryKitRoutingOverlay")
    assert overlay["inputs"]["routing"] == [sampler, 1]
    photo = load(f"{NEWER}/photo_reference", "api")
    load_image = next(i for i, e in photo.items() if e["class_type"] == "LoadImage")
    assert next(e for e in photo.values() if e["class_type"] == "StoryKitCharacterPhoto")["inputs"]["image"] == \
        [load_image, 0]


def test_widgets_read_by_name_where_1_58_saves_names(host):
    """1.58 gives every INT named seed a control_after_generate widget, flagged or not, and saves
    widgets_values_named beside the list: the converter reads by name there, so an extra widget shifts nothing."""
    saved = load(f"{NEWER}/primitive_reroute_bypass", "workflow")
    node = next(n for n in saved["nodes"] if n["type"] == "KSampler")
    node["widgets_values"].insert(2, "randomize")  # a widget this converter has no spec for, before steps
    node["widgets_values_named"] = {**dict(list(node["widgets_values_named"].items())[:2]),
                                    "control_after_generate_1": "randomize",
                                    **dict(list(node["widgets_values_named"].items())[2:])}
    prompt = conv.to_api(saved, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    sampler = next(e for e in prompt.values() if e["class_type"] == "KSampler")
    assert sampler["inputs"]["steps"] == 20 and sampler["inputs"]["sampler_name"] == "euler"


def test_subgraph_nodes_get_the_front_ends_ids(host):
    """The front end names a node inside subgraph instance 8 "8:2"; the converter flattens the same way."""
    front_end = load("subgraph", "api")
    assert sorted(i for i in front_end if ":" in i) == ["8:2", "8:3"]
    for kind in SAVED_FORMS:
        ours = conv.to_api(load("subgraph", kind), conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
        assert ours["5"]["inputs"]["positive"] == ["8:2", 0] and ours["8:3"]["inputs"]["clip"] == ["1", 1]


def tiny_overrides(prompt: dict) -> list[str]:
    """64x64 latents and 2 steps, set where the value really comes from (a node feeding the widget, if any)."""
    out = []
    for node_id, entry in prompt.items():
        if entry["class_type"] == "EmptyLatentImage":
            for name in ("width", "height"):
                value = entry["inputs"][name]
                out.append(f"{value[0]}.value=64" if isinstance(value, list) else f"{node_id}.{name}=64")
        if entry["class_type"] == "KSampler":
            out.append(f"{node_id}.steps=2")
    return sorted(set(out))


@pytest.mark.parametrize("name", [n for n in FIXTURES if runnable(n)])
def test_converted_fixture_runs(host, run_workflow, name):
    saved = load(name, "workflow")
    prompt = conv.to_api(saved, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    overrides = tiny_overrides(prompt)
    assert len(overrides) >= 2 and any(o.endswith(".steps=2") for o in overrides), overrides
    result = run_workflow(saved, tiny_model="sd15", overrides=overrides)
    saves = [i for i, e in prompt.items() if e["class_type"] == "SaveImage"]
    assert saves and all(result.outputs[i]["images"] for i in saves), result.outputs
    assert {i for i, e in prompt.items() if e["class_type"] == "KSampler"} <= set(map(str, result.ran))


def test_dynamic_prompt_choices_follow_the_front_end_rules():
    """Real choices (not the single-option ones of the fixture): every option is reachable, nesting and escapes hold."""
    import random
    rng = random.Random(0)
    seen = {conv._process_dynamic("a {red|green|{blue|teal}} fox \\{x\\} // note", rng) for _ in range(200)}
    assert seen == {f"a {c} fox {{x}} " for c in ("red", "green", "blue", "teal")}
