"""The identity-routing workflows run headless on tiny models (SDXL-like UNet and FLUX) through the real executor:
two characters alone then meeting, and a real photo as a character; frames, the routing overlay and a comic page
come out, and bounded sharing (routed attention with labelled bank tokens) really ran."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from storykit.runner.host import PACK_DIR

PHOTO = PACK_DIR / "data" / "photos" / "storykit_example_photo.jpg"
# workflow: (tiny model, latent node, frames in the story)
WORKFLOWS = {"storykit_two_characters.json": ("sdxl", "EmptyLatentImage", 6),
             "storykit_two_characters_flux.json": ("flux", "EmptySD3LatentImage", 6),
             "storykit_photo_reference.json": ("sdxl", "EmptyLatentImage", 4),
             "storykit_photo_reference_flux.json": ("flux", "EmptySD3LatentImage", 4)}


@pytest.fixture()
def routed(monkeypatch):
    """Bank labels of every routed_attention call that read the bank, and the labels of every bank write."""
    from storykit.kernels import consistent_attention
    seen = {"read": [], "written": []}
    # the host loads the pack under its own module name: spy on every copy of the kernel module
    for module in {m for n, m in sys.modules.items() if n.endswith("kernels.consistent_attention")} | \
            {consistent_attention}:
        def spy(*args, real=module.routed_attention, **kwargs):
            labels = kwargs.get("bank_labels", args[11] if len(args) > 11 else None)
            if labels is not None:
                seen["read"].append(set(labels.tolist()))
            return real(*args, **kwargs)

        def write(self, *args, real=module.ReferenceBank.write, **kwargs):
            labels = kwargs.get("labels", args[5] if len(args) > 5 else None)
            seen["written"].append(None if labels is None else set(labels.tolist()))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(module, "routed_attention", spy)
        monkeypatch.setattr(module.ReferenceBank, "write", write)
    return seen


def _with_painted_mask(data: dict, input_dir) -> dict:
    """The photo workflow as a user who painted over the person in the mask editor: LoadImage reads a PNG whose
    alpha is cleared over the person (its MASK is 1 there) and that MASK goes to Character Photo's mask."""
    from PIL import Image
    image = Image.open(PHOTO).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (image.width // 5, image.height // 8, image.width * 4 // 5, image.height))
    image.putalpha(alpha)
    image.save(input_dir / "storykit_example_photo_masked.png")
    data = json.loads(json.dumps(data))
    load = next(n for n in data["nodes"] if n["type"] == "LoadImage")
    photo = next(n for n in data["nodes"] if n["type"] == "StoryKitCharacterPhoto")
    load["widgets_values"][0] = "storykit_example_photo_masked.png"
    slot = next(i for i, s in enumerate(photo["inputs"]) if s["name"] == "mask")
    link = max(link[0] for link in data["links"]) + 1
    data["links"].append([link, load["id"], 1, photo["id"], slot, "MASK"])
    load["outputs"][1]["links"] = [link]
    photo["inputs"][slot]["link"] = link
    return data


RUNS = [(name, False) for name in sorted(WORKFLOWS)] + [("storykit_photo_reference.json", True)]


@pytest.mark.parametrize("name,painted", RUNS, ids=[f"{n[:-5]}{'-painted-mask' if m else ''}" for n, m in RUNS])
def test_routing_workflow_runs_headless(host, run_workflow, routed, name, painted):
    kind, latent, frames = WORKFLOWS[name]
    path = PACK_DIR / "workflows" / name
    data = json.loads(path.read_text(encoding="utf-8"))
    photo = any(n["type"] == "LoadImage" for n in data["nodes"])
    if photo:  # the shipped example photo, where LoadImage looks: the host's input folder
        shutil.copy(PHOTO, host.base / "input" / PHOTO.name)
    if painted:
        data = _with_painted_mask(data, host.base / "input")
    res = run_workflow(data, tiny_model=kind, overrides=[f"{latent}.width=64", f"{latent}.height=64",
                                                         "StoryKitStorySampler.steps=2"])
    titles = {str(n["id"]): n.get("title", n["type"]) for n in data["nodes"]}
    images = {titles[i]: out["images"] for i, out in res.outputs.items() if out.get("images")}
    assert len(images["SaveImage"]) == frames, images
    assert len(images["Routing overlay"]) == frames, images
    assert images["Save comic page"], images  # one page or more (long stories fill several)
    for saved in images["SaveImage"] + images["Save comic page"]:
        assert (host.base / "output" / saved.get("subfolder", "") / saved["filename"]).is_file()
    if not photo:
        assert routed["read"], "the meeting frames never read the bank through bounded sharing"
        assert {1, 2} in routed["read"]  # Lena's and Tom's references, each with its own label
        return
    # photo only: the photo is [Max]'s one reference, so it is what wrote the bank
    assert routed["written"], "the photo wrote no bank"
    if painted:  # its tokens inside the painted mask went to the bank labelled as [Max] (1), the rest background
        assert all(w == {0, 1} for w in routed["written"]), routed["written"]
        assert routed["read"] and all(r <= {0, 1} for r in routed["read"])
    else:  # no mask: the automatic mask, from the attention maps of the steps before (unknown, -1, until then)
        assert all(w is not None and w <= {-1, 0, 1} for w in routed["written"]), routed["written"]
        assert routed["written"][0] == {-1}  # the first step has no map yet: the photo's tokens are not shared
        assert any(1 in w for w in routed["written"]), routed["written"]  # later steps: [Max]'s masked tokens


def test_photo_workflow_tells_the_user_to_load_their_photo():
    """A Note beside LoadImage says how to load one's own photo; the example photo ships with its licence."""
    for name in ("storykit_photo_reference.json", "storykit_photo_reference_flux.json"):
        nodes = json.loads((PACK_DIR / "workflows" / name).read_text(encoding="utf-8"))["nodes"]
        [note] = [n for n in nodes if n["type"] == "Note"]
        assert "your own photo" in note["widgets_values"][0] and PHOTO.name in note["widgets_values"][0]
        [load] = [n for n in nodes if n["type"] == "LoadImage"]
        assert load["widgets_values"][0] == PHOTO.name
    assert PHOTO.is_file() and "MIT License" in (PHOTO.parent / "NOTICE.md").read_text(encoding="utf-8")
