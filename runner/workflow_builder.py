"""Write example graphs in the front end's saved format (version 0.4: nodes, links, widgets_values).

Used to author the shipped workflows in code; the input order, widget lists and seed-control values come from the
host's own node definitions, so the files read exactly like ones the front end saves.

    g = Graph(host.nodes.NODE_CLASS_MAPPINGS)
    ckpt = g.add("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"})
    pos = g.add("CLIPTextEncode", {"text": "a cat"})
    g.connect(ckpt, "CLIP", pos, "clip")
    Path("x.json").write_text(g.dumps())
"""
from __future__ import annotations

import json
import uuid

from .convert import CONTROL_VALUES, UPLOAD_FLAGS, host_input_specs


class Node:
    def __init__(self, graph: "Graph", node_id: int, data: dict):
        self.graph, self.id, self.data = graph, node_id, data


class Graph:
    def __init__(self, node_class_mappings: dict):
        self.mappings = node_class_mappings
        self.specs = host_input_specs(node_class_mappings)
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._col = 0

    def add(self, class_type: str, widgets: dict | None = None, title: str | None = None, mode: int = 0,
            pos: tuple[float, float] | None = None, size: tuple[float, float] | None = None,
            control: str = "fixed") -> Node:
        widgets = dict(widgets or {})
        values = []
        inputs = []
        specs = self.specs(class_type)
        if specs is None and class_type not in ("Reroute", "PrimitiveNode", "Note", "MarkdownNote"):
            raise KeyError(f"unknown node type {class_type}")
        for spec in specs or []:
            if spec.is_widget:
                if spec.name in widgets:
                    value = widgets.pop(spec.name)
                elif "default" in spec.options:
                    value = spec.options["default"]
                elif isinstance(spec.type, list):
                    value = spec.type[0] if spec.type else None
                elif spec.options.get("options"):
                    value = spec.options["options"][0]
                else:
                    value = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type)
                values.append(value)
                if spec.options.get("control_after_generate"):
                    values.append(control if control in CONTROL_VALUES else "fixed")
                for flag, marker in UPLOAD_FLAGS.items():
                    if spec.options.get(flag):
                        values.append(marker)
            else:
                inputs.append({"name": spec.name, "type": _type_name(spec.type), "link": None})
        if widgets:
            raise KeyError(f"{class_type} has no widget(s) {sorted(widgets)}")
        outputs = []
        if class_type in self.mappings:
            cls = self.mappings[class_type]
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            for index, (rtype, name) in enumerate(zip(cls.RETURN_TYPES, names, strict=True)):
                outputs.append({"name": name, "type": _type_name(rtype), "links": [], "slot_index": index})
        node_id = len(self.nodes) + 1
        if size is None:
            size = _natural_size(specs or [], len(inputs), len(outputs))
        if pos is None:
            pos = (40 + 380 * (self._col % 5), 80 + 260 * (self._col // 5))
            self._col += 1
        data = {"id": node_id, "type": class_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": mode, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": class_type}, "widgets_values": values}
        if title:
            data["title"] = title
        node = Node(self, node_id, data)
        self.nodes.append(node)
        return node

    def connect(self, src: Node, output: int | str, dst: Node, input_name: str) -> int:
        outs = src.data["outputs"]
        index = output if isinstance(output, int) else next(
            (i for i, o in enumerate(outs) if o["name"] == output or o["type"] == output), None)
        if index is None:
            raise KeyError(f"{src.data['type']} has no output {output!r}")
        slot = next((i for i, s in enumerate(dst.data["inputs"]) if s["name"] == input_name), None)
        if slot is None:  # a widget driven by a link: the front end adds a slot that names the widget
            spec = next((s for s in self.specs(dst.data["type"]) or [] if s.name == input_name), None)
            if spec is None:
                raise KeyError(f"{dst.data['type']} has no input {input_name!r}")
            dst.data["inputs"].append({"name": input_name, "type": _type_name(spec.type), "link": None,
                                       "widget": {"name": input_name}})
            slot = len(dst.data["inputs"]) - 1
        link_id = len(self.links) + 1
        ltype = outs[index]["type"]
        self.links.append([link_id, src.id, index, dst.id, slot, ltype])
        outs[index]["links"].append(link_id)
        dst.data["inputs"][slot]["link"] = link_id
        return link_id

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        xs = [n.data["pos"][0] for n in nodes]
        ys = [n.data["pos"][1] for n in nodes]
        self.groups.append({"title": title, "bounding": [min(xs) - 20, min(ys) - 60, max(xs) - min(xs) + 360,
                                                         max(ys) - min(ys) + 300], "color": color, "font_size": 24})

    def to_json(self) -> dict:
        return {"id": str(uuid.UUID(int=len(self.nodes) * 7919 + len(self.links))), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": [n.data for n in self.nodes], "links": self.links, "groups": self.groups,
                "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


def _natural_size(specs, n_inputs: int, n_outputs: int) -> tuple[int, int]:
    """Roughly the size the front end gives a new node: slot rows, a row per widget, tall multiline text boxes."""
    rows = max(n_inputs, n_outputs)
    widgets = [s for s in specs if s.is_widget]
    multiline = sum(1 for s in widgets if s.options.get("multiline"))
    width = 400 if multiline else 300
    return width, 30 + 22 * rows + 26 * (len(widgets) - multiline) + 120 * multiline


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)
