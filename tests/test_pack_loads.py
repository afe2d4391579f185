"""The pack inside the real host: it imports with no failure, and every node's schema is one the host accepts."""
import importlib
import json

import pytest


def test_pack_loaded_without_import_failure(host):
    from storykit.runner import host as host_mod
    assert host_mod.pack_load_failures() == []
    pack = [k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("StoryKit")]
    assert pack, "the host registered no StoryKit node"


def test_every_node_module_imports(host):
    nodes_pkg = importlib.import_module("storykit.nodes")
    names = nodes_pkg.node_modules()
    assert names
    nodes_pkg.load_nodes(strict=True)


def _pack_nodes(host):
    from storykit.runner import cli
    from storykit.runner.host import PACK_DIR
    out = []
    for key, cls in host.nodes.NODE_CLASS_MAPPINGS.items():
        if (getattr(cls, "RELATIVE_PYTHON_MODULE", None) or "").endswith(".storykit") or key.startswith("StoryKit"):
            if key not in set(cli.TINY_NODES.values()):  # dev nodes the runner registers, not the pack's
                out.append((key, cls))
    assert PACK_DIR.is_dir()
    return out


def test_node_schemas_are_valid(host):
    for key, cls in _pack_nodes(host):
        schema = cls.GET_SCHEMA()
        assert schema.node_id == key and key.startswith("StoryKit")
        assert schema.category and schema.category.startswith("StoryKit"), key
        assert schema.display_name, key
        assert schema.description, f"{key} has no description"
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{key}.{inp.id} has no tooltip"
        # What the server's /object_info sends the front end for this node must build and be JSON.
        info = json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
        assert info["name"] == key and info["category"] == schema.category
        assert len(info["output"]) == len(info["output_name"]) == len(info["output_is_list"])
        assert "required" in info["input"]


@pytest.mark.parametrize("section", ["required", "optional"])
def test_node_inputs_have_types(host, section):
    for key, cls in _pack_nodes(host):
        for name, spec in (cls.INPUT_TYPES().get(section) or {}).items():
            assert isinstance(spec, tuple) and spec, f"{key}.{name}"
