"""ConsiStory+ (the One-Prompt-One-Story benchmark prompts) -> StoryKit stories, and back (plain Python).

Each of its 192 subject sets becomes one story: the subject is the character line, every setting a frame line
`{style} [token] {setting}`, so the Story Prompt node's frame prompt is exactly 1P1S's `style subject setting`.
identity_prompt (`style subject`) and frame_prompts (the settings) fill a One-Prompt-One-Story workflow.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..kernels import story_plan
from ..kernels.safefiles import numbered_path

DATA = Path(__file__).resolve().parent.parent / "data" / "consistory_plus.yaml"
ID_PREFIX = "consistory+"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def load_sets(path: str | Path = DATA) -> list[dict]:
    """The subject sets in file order, each with its super-class: {class, concept_token, style, subject, settings}."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected super-classes at the top level (ConsiStory+ layout)")
    return [{"class": cls, **entry} for cls, entries in data.items() for entry in entries]


def to_story(entry: dict, index: int) -> dict:
    """One subject set -> {id, story, identity_prompt, frame_prompts} (the batch runner's stories-file row)."""
    token, style, subject = _clean(entry["concept_token"]), _clean(entry["style"]), _clean(entry["subject"])
    settings = [_clean(s) for s in entry["settings"]]
    for text in (token, style, subject, *settings):
        if any(c in text for c in "[]#\n"):
            raise ValueError(f"ConsiStory+ set {index} ({token}): '{text}' holds a character the story syntax "
                             "reserves ([, ] or #)")
    lines = [f"[{token}] {subject}"] + [_clean(f"{style} [{token}] {s}") for s in settings]
    return {"id": f"{ID_PREFIX}/{index:03d}-{entry['class']}-{token.replace(' ', '_')}", "story": "\n".join(lines),
            "identity_prompt": _clean(f"{style} {subject}"), "frame_prompts": settings}


def from_story(story: dict) -> dict:
    """The inverse through StoryKit's own parser: {concept_token, style, subject, settings} of a converted story."""
    plan = story_plan.parse_story(story["story"])
    (token, subject), = plan.characters.items()
    style = story["identity_prompt"][: -len(subject)].strip()
    settings = []
    head = _clean(f"{style} {subject}") + " "
    for frame in plan.frames:
        if not frame.prompt.startswith(head) or frame.characters != (token,):
            raise ValueError(f"{story['id']}: frame {frame.index + 1} reads '{frame.prompt}'")
        settings.append(frame.prompt[len(head):])
    return {"concept_token": token, "style": style, "subject": subject, "settings": settings}


def convert(path: str | Path = DATA) -> list[dict]:
    return [to_story(entry, i) for i, entry in enumerate(load_sets(path))]


def write_stories(out: str | Path, path: str | Path = DATA) -> Path:
    """Write the converted stories as YAML or JSON (by suffix), never over an existing file."""
    out = Path(out)
    if out.exists():
        out = Path(numbered_path(out.parent, out.stem, ext=out.suffix))
    stories = convert(path)
    text = json.dumps(stories, indent=1) if out.suffix == ".json" else \
        yaml.safe_dump(stories, sort_keys=False, allow_unicode=True, width=1000)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
