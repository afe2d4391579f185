"""UI -> API conversion against the host's real node definitions: widgets, seed controls, primitives, reroutes,
bypassed and muted nodes, and the errors a user sees."""
import copy
import json
import random
from pathlib import Path

import pytest

from storykit.runner import convert as conv

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


@pytest.fixture(scope="module")
def specs(host):
    return conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)


@pytest.fixture()
def basic():
    return json.loads((WORKFLOWS / "storykit_sd15_basic.json").read_text())


def _node(wf, node_id):
    return next(n for n in wf["nodes"] if n["id"] == node_id)


def _add_link(wf, origin, oslot, target, tslot, ltype):
    link_id = wf["last_link_id"] = wf["last_link_id"] + 1
    wf["links"].append([link_id, origin, oslot, target, tslot, ltype])
    return link_id


def test_widgets_follow_the_node_definition(basic, specs):
    prompt = conv.to_api(basic, specs).prompt
    ks = prompt["5"]
    assert ks["class_type"] == "KSampler"
    assert ks["inputs"]["seed"] == 42 and ks["inputs"]["steps"] == 20 and ks["inputs"]["cfg"] == 7.0
    assert ks["inputs"]["sampler_name"] == "euler" and ks["inputs"]["scheduler"] == "normal"
    assert "control_after_generate" not in ks["inputs"]
    assert ks["inputs"]["model"] == ["1", 0] and ks["inputs"]["latent_image"] == ["4", 0]
    assert prompt["2"]["_meta"]["title"] == "Positive"


def test_seed_control_applies_between_runs(basic, specs):
    _node(basic, 5)["widgets_values"][1] = "increment"
    converted = conv.to_api(basic, specs)
    conv.apply_controls(converted.prompt, converted.controls, random.Random(0))
    assert converted.prompt["5"]["inputs"]["seed"] == 43
    _node(basic, 5)["widgets_values"][1] = "randomize"
    converted = conv.to_api(basic, specs)
    conv.apply_controls(converted.prompt, converted.controls, random.Random(0))
    assert converted.prompt["5"]["inputs"]["seed"] != 42
    assert 0 <= converted.prompt["5"]["inputs"]["seed"] <= conv.RANDOM_SEED_MAX


def test_primitive_node_drives_a_widget(basic, specs):
    ks = _node(basic, 5)
    prim = {"id": 20, "type": "PrimitiveNode", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 8, "mode": 0,
            "inputs": [], "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "seed"}}],
            "properties": {"Run widget replace on values": False}, "widgets_values": [1234, "increment"],
            "title": "seed"}
    basic["nodes"].append(prim)
    link = _add_link(basic, 20, 0, 5, len(ks["inputs"]), "INT")
    prim["outputs"][0]["links"].append(link)
    ks["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": link})
    converted = conv.to_api(basic, specs)
    assert "20" not in converted.prompt
    assert converted.prompt["5"]["inputs"]["seed"] == 1234
    conv.apply_controls(converted.prompt, converted.controls, random.Random(0))
    assert converted.prompt["5"]["inputs"]["seed"] == 1235


def test_reroute_is_followed(basic, specs):
    ks = _node(basic, 5)
    model_slot = next(i for i, s in enumerate(ks["inputs"]) if s["name"] == "model")
    old = ks["inputs"][model_slot]["link"]
    basic["links"] = [ln for ln in basic["links"] if ln[0] != old]
    basic["nodes"].append({"id": 21, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {}, "order": 1,
                           "mode": 0, "inputs": [{"name": "", "type": "*", "link": None}],
                           "outputs": [{"name": "", "type": "MODEL", "links": []}],
                           "properties": {"showOutputText": False, "horizontal": False}})
    a = _add_link(basic, 1, 0, 21, 0, "MODEL")
    b = _add_link(basic, 21, 0, 5, model_slot, "MODEL")
    _node(basic, 21)["inputs"][0]["link"] = a
    _node(basic, 21)["outputs"][0]["links"].append(b)
    ks["inputs"][model_slot]["link"] = b
    prompt = conv.to_api(basic, specs).prompt
    assert "21" not in prompt and prompt["5"]["inputs"]["model"] == ["1", 0]


def _insert_invert(basic, mode):
    """VAEDecode -> ImageInvert -> SaveImage, with the invert node in the given mode."""
    save = _node(basic, 7)
    old = save["inputs"][0]["link"]
    basic["links"] = [ln for ln in basic["links"] if ln[0] != old]
    inv = {"id": 22, "type": "ImageInvert", "pos": [0, 0], "size": [200, 30], "flags": {}, "order": 6, "mode": mode,
           "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
           "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}], "properties": {}, "widgets_values": []}
    basic["nodes"].append(inv)
    a = _add_link(basic, 6, 0, 22, 0, "IMAGE")
    b = _add_link(basic, 22, 0, 7, 0, "IMAGE")
    inv["inputs"][0]["link"] = a
    inv["outputs"][0]["links"].append(b)
    save["inputs"][0]["link"] = b


def test_bypassed_node_passes_its_matching_input_through(basic, specs):
    _insert_invert(basic, conv.MODE_BYPASS)
    prompt = conv.to_api(basic, specs).prompt
    assert "22" not in prompt and prompt["7"]["inputs"]["images"] == ["6", 0]
    active = copy.deepcopy(basic)
    _node(active, 22)["mode"] = 0
    assert conv.to_api(active, specs).prompt["7"]["inputs"]["images"] == ["22", 0]


def test_muted_node_and_its_readers_inputs_disappear(basic, specs):
    _insert_invert(basic, conv.MODE_MUTED)
    prompt = conv.to_api(basic, specs).prompt
    assert "22" not in prompt and "images" not in prompt["7"]["inputs"]


def test_api_format_and_request_body_pass_through(basic, specs):
    prompt = conv.to_api(basic, specs).prompt
    assert conv.to_api(prompt, specs).prompt == prompt
    assert conv.to_api({"prompt": prompt, "client_id": "x"}, specs).prompt == prompt


def test_missing_node_types_are_listed(basic, specs):
    basic["nodes"].append({"id": 30, "type": "SomePackNode", "mode": 0, "inputs": [], "outputs": [],
                           "widgets_values": []})
    with pytest.raises(conv.MissingNodes, match="SomePackNode"):
        conv.to_api(basic, specs)


def test_overrides_by_id_and_title(basic, specs):
    prompt = conv.to_api(basic, specs).prompt
    conv.apply_overrides(prompt, ["5.seed=7", "Positive.text=a blue fox", "5.cfg=3.5"])
    assert prompt["5"]["inputs"]["seed"] == 7 and prompt["5"]["inputs"]["cfg"] == 3.5
    assert prompt["2"]["inputs"]["text"] == "a blue fox"
    conv.apply_overrides(prompt, ["KSampler.steps=3"])
    assert prompt["5"]["inputs"]["steps"] == 3
    with pytest.raises(conv.WorkflowError, match="no node with id, title or type"):
        conv.apply_overrides(prompt, ["99.seed=1"])
    with pytest.raises(conv.WorkflowError, match="NODE.INPUT=VALUE"):
        conv.apply_overrides(prompt, ["seed=1"])


def test_dynamic_prompt_widgets_are_resolved_like_the_front_end(basic, specs):
    _node(basic, 2)["widgets_values"][0] = "a {red|red} fox /* note */"
    prompt = conv.to_api(basic, specs).prompt
    assert prompt["2"]["inputs"]["text"] == "a red fox "


def test_subgraph_instance_of_unknown_definition_is_a_missing_node(basic, specs):
    """Subgraphs are flattened (see test_frontend_conversion); an instance whose definition is absent is named."""
    basic["nodes"].append({"id": 31, "type": "0f6a1c52-0000-4000-8000-000000000000", "mode": 0, "inputs": [],
                           "outputs": [], "widgets_values": []})
    with pytest.raises(conv.MissingNodes, match="0f6a1c52"):
        conv.to_api(basic, specs)
