"""Turn a workflow saved by the ComfyUI front end (nodes + links + widgets_values) into the API prompt format.

Follows the front end's own graph-to-prompt rules: muted nodes vanish together with the inputs that read them,
bypassed nodes pass an input of the same type through, Reroute and Note nodes are virtual, a PrimitiveNode's value
lands in the widget it drives, subgraphs are flattened into "outer:inner" node ids, and a seed widget's "control
after generate" value is kept so repeated runs can increment or randomise it the way the front end does between
queued prompts. tests/test_frontend_conversion.py checks all this against prompts made by the real front end.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODE_MUTED = 2
MODE_BYPASS = 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPE = "PrimitiveNode"
# The front end caps random seeds here (2**50), well inside every seed widget's max.
RANDOM_SEED_MAX = 1125899906842624


class WorkflowError(ValueError):
    """A workflow file that cannot be turned into a prompt; the message says what to change."""


@dataclass
class InputSpec:
    name: str
    type: Any
    options: dict

    @property
    def is_widget(self) -> bool:
        if self.options.get("forceInput"):
            return False
        return isinstance(self.type, list) or self.type in WIDGET_TYPES


@dataclass
class Control:
    """A widget whose value the front end changes after each queued prompt."""
    node_id: str
    input_name: str
    mode: str
    minimum: float | None
    maximum: float | None
    step: float = 1
    targets: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Converted:
    prompt: dict
    controls: list[Control]


InputSpecs = Callable[[str], "list[InputSpec] | None"]


def host_input_specs(node_class_mappings: dict) -> InputSpecs:
    """Input definitions read from the host's registered node classes, in the order the front end lays widgets."""
    def specs(class_type: str) -> list[InputSpec] | None:
        cls = node_class_mappings.get(class_type)
        if cls is None:
            return None
        types = cls.INPUT_TYPES()
        out = []
        for section in ("required", "optional"):
            for name, value in (types.get(section) or {}).items():
                kind = value[0] if isinstance(value, (tuple, list)) and value else value
                opts = value[1] if isinstance(value, (tuple, list)) and len(value) > 1 and isinstance(value[1], dict) else {}
                out.append(InputSpec(name, kind, opts))
        return out
    return specs


def object_info_input_specs(object_info: dict) -> InputSpecs:
    """Input definitions from a server's /object_info, which is what the front end itself reads."""
    def specs(class_type: str) -> list[InputSpec] | None:
        info = object_info.get(class_type)
        if info is None:
            return None
        order = info.get("input_order") or {s: list((info["input"].get(s) or {})) for s in ("required", "optional")}
        out = []
        for section in ("required", "optional"):
            for name in order.get(section, []):
                value = info["input"][section][name]
                opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
                out.append(InputSpec(name, value[0], opts))
        return out
    return specs


def load_workflow_file(path: str | Path) -> dict:
    """Read a workflow from .json, or from the text chunks ComfyUI writes into the PNGs it saves."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"workflow file {path} does not exist")
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as img:
            text = img.info.get("workflow") or img.info.get("prompt")
        if not text:
            raise WorkflowError(f"{path} carries no ComfyUI workflow (no 'workflow' or 'prompt' text chunk)")
        return json.loads(text)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{path} is not valid JSON: {exc}") from exc


def is_api_format(data: dict) -> bool:
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def to_api(data: dict, specs: InputSpecs) -> Converted:
    """Any workflow shape (UI, API, or a /prompt request body) -> API prompt plus the seed controls."""
    if "prompt" in data and isinstance(data["prompt"], dict) and is_api_format(data["prompt"]):
        data = data["prompt"]
    if is_api_format(data):
        return Converted(json.loads(json.dumps(data)), [])
    if "nodes" not in data or "links" not in data:
        raise WorkflowError("not a ComfyUI workflow: expected the front end's format (nodes, links) or the API "
                            "format ({id: {class_type, inputs}})")
    return _UiGraph(data, specs).convert()


def _link_tuple(link) -> tuple:
    if isinstance(link, dict):
        return (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                link.get("type"))
    return tuple(link[:6])


class _UiGraph:
    def __init__(self, data: dict, specs: InputSpecs):
        if (data.get("definitions") or {}).get("subgraphs"):
            data = _flatten_subgraphs(data)
        self.specs = specs
        self.nodes = {str(n["id"]): n for n in data["nodes"]}
        self.links = {}
        for raw in data["links"]:
            link_id, origin, oslot, target, tslot, ltype = _link_tuple(raw)
            self.links[link_id] = (str(origin), int(oslot), str(target), int(tslot), ltype)

    def convert(self) -> Converted:
        self._check_missing()
        prompt: dict[str, dict] = {}
        controls: list[Control] = []
        for node_id, node in self.nodes.items():
            ntype = node["type"]
            if ntype in NOTE_TYPES or ntype in REROUTE_TYPES or ntype == PRIMITIVE_TYPE:
                if ntype == PRIMITIVE_TYPE:
                    controls.extend(self._primitive_control(node_id, node))
                continue
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
                continue
            inputs, node_controls = self._widget_inputs(node_id, node)
            linked = set()
            for slot in node.get("inputs") or []:
                if slot.get("link") is None:
                    continue
                source = self._resolve(slot["link"], slot.get("type"))
                name = slot.get("widget", {}).get("name") or slot["name"]
                linked.add(name)
                if source is None:  # nothing at the end of the link: a widget keeps its own value
                    continue
                if source[0] == "value":
                    inputs[name] = _wrap_list(source[1])
                else:
                    inputs[name] = [source[1], source[2]]
            # A widget driven by a link takes its value from there; its own control widget changes nothing.
            controls.extend(c for c in node_controls if c.input_name not in linked)
            entry = {"class_type": ntype, "inputs": inputs}
            title = node.get("title")
            if title:
                entry["_meta"] = {"title": title}
            prompt[node_id] = entry
        # The front end drops links to nodes that did not make it into the prompt (muted ones).
        for entry in prompt.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                    del entry["inputs"][name]
        for control in controls:
            control.targets = [t for t in control.targets if t[0] in prompt]
        return Converted(prompt, [c for c in controls if c.targets])

    def _check_missing(self) -> None:
        missing = sorted({n["type"] for n in self.nodes.values()
                          if n["type"] not in NOTE_TYPES | REROUTE_TYPES | {PRIMITIVE_TYPE}
                          and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS) and self.specs(n["type"]) is None})
        if missing:
            raise MissingNodes(missing)

    def _widget_inputs(self, node_id: str, node: dict) -> tuple[dict, list[Control]]:
        inputs, controls = self._saved_widget_inputs(node_id, node)
        specs = {spec.name: spec for spec in self.specs(node["type"]) or []}
        for name, value in (node.get(PROMOTED_KEY) or {}).items():  # set on the subgraph node that shows it
            if name in specs:
                inputs[name] = _wrap_list(_dynamic_prompt(specs[name], value))
        return inputs, controls

    def _saved_widget_inputs(self, node_id: str, node: dict) -> tuple[dict, list[Control]]:
        specs = self.specs(node["type"]) or []
        values = node.get("widgets_values")
        inputs: dict[str, Any] = {}
        controls: list[Control] = []
        if isinstance(values, dict):  # some packs save widgets by name
            for spec in specs:
                if spec.is_widget and spec.name in values:
                    inputs[spec.name] = _wrap_list(_dynamic_prompt(spec, values[spec.name]))
            return inputs, controls
        values = list(values or [])
        named = node.get("widgets_values_named")
        if isinstance(named, dict) and len(named) == len(values):
            return self._named_widget_inputs(node_id, specs, named)
        pos = 0
        for spec in specs:
            if not spec.is_widget:
                continue
            if pos >= len(values):
                break
            inputs[spec.name] = _wrap_list(_dynamic_prompt(spec, values[pos]))
            pos += 1
            if spec.options.get("control_after_generate") and pos < len(values) and values[pos] in CONTROL_VALUES:
                controls.append(Control(node_id, spec.name, values[pos], spec.options.get("min"),
                                        spec.options.get("max"), spec.options.get("step", 1) or 1,
                                        [(node_id, spec.name)]))
                pos += 1
            for flag, marker in UPLOAD_FLAGS.items():
                if spec.options.get(flag) and pos < len(values) and values[pos] == marker:
                    pos += 1
        return inputs, controls

    def _named_widget_inputs(self, node_id: str, specs, named: dict) -> tuple[dict, list[Control]]:
        """Front end 1.5x saves `widgets_values_named` beside the list, in widget order. Reading by name survives the
        widgets the front end adds on its own (1.58 gives every INT input named seed a control_after_generate,
        flagged or not), where reading the list by position would shift every later value."""
        inputs: dict[str, Any] = {}
        controls: list[Control] = []
        keys = list(named)
        for spec in specs:
            if not spec.is_widget or spec.name not in named:
                continue
            inputs[spec.name] = _wrap_list(_dynamic_prompt(spec, named[spec.name]))
            after = keys.index(spec.name) + 1
            if after < len(keys) and keys[after].startswith("control_after_generate") \
                    and named[keys[after]] in CONTROL_VALUES:
                controls.append(Control(node_id, spec.name, named[keys[after]], spec.options.get("min"),
                                        spec.options.get("max"), spec.options.get("step", 1) or 1,
                                        [(node_id, spec.name)]))
        return inputs, controls

    def _primitive_control(self, node_id: str, node: dict) -> list[Control]:
        values = node.get("widgets_values") or []
        if len(values) < 2 or values[1] not in CONTROL_VALUES:
            return []
        targets = []
        for link_id in (node.get("outputs") or [{}])[0].get("links") or []:
            link = self.links.get(link_id)
            if link is None:
                continue
            target = self.nodes.get(link[2])
            if target is None or target.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
                continue
            slot = target["inputs"][link[3]]
            targets.append((link[2], slot.get("widget", {}).get("name") or slot["name"]))
        spec_opts = self._target_options(targets)
        return [Control(node_id, "value", values[1], spec_opts.get("min"), spec_opts.get("max"),
                        spec_opts.get("step", 1) or 1, targets)]

    def _target_options(self, targets) -> dict:
        for node_id, name in targets:
            for spec in self.specs(self.nodes[node_id]["type"]) or []:
                if spec.name == name:
                    return spec.options
        return {}

    def _resolve(self, link_id, wanted_type):
        """Follow a link back through reroutes, primitives and bypassed nodes, as the front end does."""
        seen = set()
        while True:
            if link_id in seen:
                raise WorkflowError(f"link {link_id} loops through reroutes or bypassed nodes")
            seen.add(link_id)
            link = self.links.get(link_id)
            if link is None:
                return None
            origin_id, origin_slot = link[0], link[1]
            origin = self.nodes.get(origin_id)
            if origin is None:
                return None
            otype = origin["type"]
            if otype == PRIMITIVE_TYPE:
                values = origin.get("widgets_values") or []
                return ("value", values[0]) if values else None
            if otype in REROUTE_TYPES:
                link_id = (origin.get("inputs") or [{}])[0].get("link")
                if link_id is None:
                    return None
                continue
            if origin.get("mode", 0) == MODE_BYPASS:
                index = _bypass_input(origin, origin_slot, wanted_type)
                if index is None:
                    return None
                # The front end goes on looking for the type of the bypassed node's own input.
                wanted_type = origin["inputs"][index].get("type")
                link_id = origin["inputs"][index].get("link")
                if link_id is None:
                    return None
                continue
            # A muted origin stays a link here; convert() drops links to nodes left out of the prompt.
            return ("link", origin_id, origin_slot)


def _valid_connection(a, b) -> bool:
    """LiteGraph.isValidConnection: "*" and "" match anything, comma lists match if any part does, case-blind."""
    a = 0 if a in ("", "*") else a
    b = 0 if b in ("", "*") else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


def _bypass_input(node: dict, origin_slot: int, wanted_type) -> int | None:
    """Which input a bypassed node hands on for one of its outputs (ExecutableNodeDTO's rule in the front end):
    the input at the output's index if it fits both types, else the first of exactly the wanted type, else the first
    that fits both."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    if wanted_type in ("*", ""):
        index = origin_slot if len(inputs) > origin_slot else 0
        return index if index < len(inputs) else None
    out_type = outputs[origin_slot].get("type") if origin_slot < len(outputs) else None
    def fits(slot: dict) -> bool:
        return _valid_connection(slot.get("type"), out_type) and _valid_connection(slot.get("type"), wanted_type)
    if origin_slot < len(inputs) and fits(inputs[origin_slot]):
        return origin_slot
    for index, slot in enumerate(inputs):
        if slot.get("type") == wanted_type:
            return index
    for index, slot in enumerate(inputs):
        if fits(slot):
            return index
    return None


SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20


def _flatten_subgraphs(data: dict) -> dict:
    """Replace every subgraph instance by its inner nodes, named as the front end names them in the prompt: node 2 of
    instance 8 is "8:2" (nested: "8:5:2"). Links through the subgraph's input and output slots are joined up. A muted
    or bypassed instance stays one node, which the converter then leaves out or passes through by type."""
    definitions = {sg["id"]: sg for sg in data["definitions"]["subgraphs"]}
    nodes: list[dict] = []
    links: list[list] = []

    def add_link(source, target_id: str, target_slot: int, ltype):
        links.append([len(links) + 1, source[0], source[1], target_id, target_slot, ltype])
        return len(links)

    def expand(level_nodes: list, level_links: list, prefix: str, input_sources: list, depth: int) -> dict:
        if depth > 32:
            raise WorkflowError("subgraphs nested more than 32 deep (a subgraph that contains itself?)")
        by_id = {n["id"]: n for n in level_nodes}
        by_link = {}
        for raw in level_links:
            link = _link_tuple(raw)
            by_link[link[0]] = link
        instance_outputs: dict = {}

        def source(link_id):
            """(flat origin id, slot) that feeds this link, or None when nothing does."""
            link = by_link.get(link_id)
            if link is None:
                return None
            origin_id, origin_slot = link[1], int(link[2])
            if origin_id == SUBGRAPH_INPUT_NODE:
                return input_sources[origin_slot] if origin_slot < len(input_sources) else None
            origin = by_id.get(origin_id)
            if origin is not None and origin["type"] in definitions and origin.get("mode", 0) not in (MODE_MUTED,
                                                                                                       MODE_BYPASS):
                if origin_id not in instance_outputs:
                    instance_outputs[origin_id] = expand_instance(origin)
                return instance_outputs[origin_id].get(origin_slot)
            return (prefix + str(origin_id), origin_slot)

        def expand_instance(node: dict) -> dict:
            definition = definitions[node["type"]]
            # Matched by name: the exported form drops unplugged widget slots, so indices may shift.
            plugged = {slot["name"]: slot.get("link") for slot in node.get("inputs") or []}
            shown = _instance_widget_values(node)
            sources = [source(plugged[slot["name"]]) if plugged.get(slot["name"]) is not None
                       else _Promoted(shown[slot["name"]]) if slot["name"] in shown else None
                       for slot in definition.get("inputs") or []]
            return expand(definition.get("nodes") or [], definition.get("links") or [],
                          f"{prefix}{node['id']}:", sources, depth + 1)

        outputs = {}
        for raw in level_links:
            link = _link_tuple(raw)
            if link[3] == SUBGRAPH_OUTPUT_NODE:
                outputs[int(link[4])] = source(link[0])
        for node in level_nodes:
            if node["type"] in definitions and node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS):
                if node["id"] not in instance_outputs:
                    instance_outputs[node["id"]] = expand_instance(node)
                continue
            flat = {**node, "id": prefix + str(node["id"]),
                    "outputs": [{**slot, "links": []} for slot in node.get("outputs") or []]}
            flat["inputs"] = []
            for index, slot in enumerate(node.get("inputs") or []):
                origin = source(slot["link"]) if slot.get("link") is not None else None
                if isinstance(origin, _Promoted):  # a promoted widget: the value set on the subgraph node
                    if slot.get("widget"):
                        flat.setdefault(PROMOTED_KEY, {})[slot["widget"]["name"]] = origin.value
                    origin = None
                new_link = add_link(origin, flat["id"], index, slot.get("type")) if origin else None
                flat["inputs"].append({**slot, "link": new_link})
            nodes.append(flat)
        return outputs

    expand(data["nodes"], data["links"], "", [], 0)
    flat_nodes = {n["id"]: n for n in nodes}
    for link in links:
        origin = flat_nodes.get(link[1])
        if origin is not None and link[2] < len(origin["outputs"]):
            origin["outputs"][link[2]]["links"].append(link[0])
    return {**data, "nodes": nodes, "links": links, "definitions": {}}


PROMOTED_KEY = "storykit_promoted_widgets"


@dataclass(frozen=True)
class _Promoted:
    """A subgraph input with nothing plugged in whose widget the subgraph node shows (front end 1.5x promotes
    widgets this way): the inner widget it is wired to takes the value set on the subgraph node."""
    value: Any


def _instance_widget_values(node: dict) -> dict:
    """Widget values of a subgraph node by input name: 1.5x's widgets_values_named, else its widget slots in order."""
    named = node.get("widgets_values_named")
    if isinstance(named, dict):
        return dict(named)
    values = node.get("widgets_values")
    if not isinstance(values, list):
        return {}
    slots = [slot["name"] for slot in node.get("inputs") or [] if slot.get("widget")]
    return dict(zip(slots, values, strict=True)) if len(slots) == len(values) else {}


class MissingNodes(WorkflowError):
    def __init__(self, types: list[str]):
        self.types = types
        super().__init__("the workflow uses node types this ComfyUI does not have: " + ", ".join(types)
                         + ". Install the packs that provide them (ComfyUI-Manager: Install Missing Custom Nodes), "
                           "or remove those nodes")


_COMMENT = re.compile(r"/\*[\s\S]*?\*/|//.*")
_ESCAPED = re.compile(r"\\([{}|])")


def _wrap_list(value):
    """The front end sends a list-valued widget as {"__value__": [...]}, so the host cannot take it for a link."""
    return {"__value__": value} if isinstance(value, list) else value


def _dynamic_prompt(spec: InputSpec, value):
    """The front end's processDynamicPrompt, run on widgets marked dynamicPrompts before queueing: strip /* */ and //
    comments, pick one option of each {a|b|c} (nested allowed) at random, and keep \\{ \\} \\| as literal characters."""
    if not spec.options.get("dynamicPrompts") or not isinstance(value, str):
        return value
    return _process_dynamic(value, random)


def _process_dynamic(text: str, rng) -> str:
    text = _COMMENT.sub("", text)
    pos = 0
    out = []

    def choice_block() -> str:
        nonlocal pos
        options, current, depth = [], "", 0
        while pos < len(text):
            char = text[pos]
            pos += 1
            if char == "\\":
                current += "\\" + text[pos:pos + 1]
                pos += 1
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if not depth:
                    break
                depth -= 1
            elif char == "|" and not depth:
                options.append(current)
                current = ""
                continue
            current += char
        options.append(current)
        return _process_dynamic(rng.choice(options), rng)

    while pos < len(text):
        char = text[pos]
        pos += 1
        if char == "\\":
            out.append("\\" + text[pos:pos + 1])
            pos += 1
        elif char == "{":
            out.append(choice_block())
        else:
            out.append(char)
    return _ESCAPED.sub(r"\1", "".join(out))


def apply_controls(prompt: dict, controls: list[Control], rng: random.Random) -> None:
    """What the front end does to seed-like widgets after a prompt is queued (its default, "after")."""
    for control in controls:
        if control.mode == "fixed" or not control.targets:
            continue
        node_id, name = control.targets[0]
        value = prompt[node_id]["inputs"].get(name)
        if isinstance(value, list) or value is None:
            continue
        lo = control.minimum if control.minimum is not None else 0
        hi = control.maximum if control.maximum is not None else RANDOM_SEED_MAX
        if control.mode == "randomize":
            new = rng.randint(int(lo), int(min(hi, RANDOM_SEED_MAX)))
        elif control.mode == "increment":
            new = min(value + control.step, hi)
        else:
            new = max(value - control.step, lo)
        for target_id, target_name in control.targets:
            if not isinstance(prompt[target_id]["inputs"].get(target_name), list):
                prompt[target_id]["inputs"][target_name] = new


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """--set NODE.INPUT=VALUE, NODE being an id, a node title or a node type (every node of it); VALUE parsed as JSON
    when it parses."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        node_ref, dot, name = key.rpartition(".")
        if not sep or not dot or not node_ref or not name:
            raise WorkflowError(f"--set {item!r}: write it as NODE.INPUT=VALUE, e.g. --set 3.seed=7")
        matches = [nid for nid, e in prompt.items() if nid == node_ref] or \
                  [nid for nid, e in prompt.items() if (e.get("_meta") or {}).get("title") == node_ref] or \
                  [nid for nid, e in prompt.items() if e["class_type"] == node_ref]
        if not matches:
            raise WorkflowError(f"--set {item!r}: no node with id, title or type {node_ref!r}; ids in this workflow: "
                                + ", ".join(sorted(prompt, key=_id_key)))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for nid in matches:
            prompt[nid]["inputs"][name] = value


def _id_key(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
