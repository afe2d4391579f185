"""The story syntax parser: characters, frames, captions, references and errors that name the line and the fix."""
from __future__ import annotations

import pytest

from storykit.kernels.story_plan import parse_story

STORY = """[Mia] a young woman with red hair
[Otto] an old man with a beard
[Mia] wakes up # Monday.
[mia] runs for the tram
[Otto] feeds pigeons # Otto.
[Mia] and [Otto] share an umbrella # They meet.
[NC] an empty street # The end.
[Otto] walks home"""


def test_parse_characters_frames_captions():
    plan = parse_story(STORY, style="comic, {prompt}")
    assert plan.characters == {"Mia": "a young woman with red hair", "Otto": "an old man with a beard"}
    assert [f.characters for f in plan.frames] == [("Mia",), ("Mia",), ("Otto",), ("Mia", "Otto"), (), ("Otto",)]
    assert plan.frames[0].prompt == "comic, a young woman with red hair wakes up"
    assert plan.frames[3].prompt == "comic, a young woman with red hair and an old man with a beard share an umbrella"
    assert plan.frames[4].prompt == "comic, an empty street"
    assert plan.captions == ["Monday.", "", "Otto.", "They meet.", "The end.", ""]
    assert [f.line for f in plan.frames] == [3, 4, 5, 6, 7, 8]


def test_auto_references_prefer_solo_frames_any_number_of_characters():
    story = "\n".join(f"[C{i}] person {i}" for i in range(4)) + "\n" + \
        "\n".join(f"[C{i}] scene {j}" for j in range(3) for i in range(4)) + "\n[C0] and [C1] and [C2] dance"
    plan = parse_story(story, references_per_character=2)
    refs = plan.reference_indices()
    assert len(refs) == 8 and all(len(plan.frames[i].characters) == 1 for i in refs)
    assert plan.frames[-1].characters == ("C0", "C1", "C2") and not plan.frames[-1].reference


def test_auto_references_fall_back_to_shared_frames():
    plan = parse_story("[A] a\n[B] b\n[A] and [B] talk\n[A] waves", references_per_character=2)
    assert plan.reference_indices() == [0, 1] and plan.notes


def test_first_mode_references_are_the_first_frames():
    plan = parse_story("[A] a\n[A] one\n[A] two\n[A] three", references_per_character=2, reference_mode="first")
    assert plan.reference_indices() == [0, 1]


@pytest.mark.parametrize("story,kw,message", [
    ("[A] a\n[A] ok\n[Bob] walks", {}, r"line 3 .*names \[Bob\], who has no character line.*Add a line '\[Bob\]"),
    ("[A] a\n[NC] street\n[A] ok", {"reference_mode": "first"}, r"line 2.*reference slots.*Move the \[NC\] frame"),
    ("[A] a\n[A] ok\n   # just a caption", {}, r"line 3.*empty"),
    ("[A] a\n[A] ok\n[NC] # caption", {}, r"line 3.*empty"),
    ("[A] a\n[A] ok\n[NC] [A] both", {}, r"line 3.*\[NC\].*also names \[A\]"),
    ("[A]\n[A] ok", {}, r"line 1.*no description"),
    ("[A] a\n[B] b\n[A] ok", {}, r"line 2.*\[B\] has a character line but no frame mentions"),
    ("", {}, r"story is empty"),
    ("[A] a", {}, r"no frame lines"),
    ("[A] a\n[B] b\n[B] walks\n[A] walks", {"reference_mode": "first", "references_per_character": 1},
     r"\[A\] is in none of the first 1 frames"),
])
def test_malformed_stories_name_line_and_fix(story, kw, message):
    with pytest.raises(ValueError, match=message):
        parse_story(story, **kw)
