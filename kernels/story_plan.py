"""StoryDiffusion's story syntax -> a story plan: characters, per-frame prompts, captions and reference frames.

    [Lena] a young woman with short red hair, green raincoat      <- character line (before the first frame)
    [Lena] wakes up in a small attic room # Morning.              <- frame: [Lena] becomes her description
    [Lena] and [Bob] meet at the market # They meet.              <- a frame with two characters
    [NC] an empty street in the rain                              <- no character: plain self-attention
    [Lena@left] and [Bob@right] share an umbrella                 <- a place per character: a layout box

Plain Python (no torch, no ComfyUI): the node turns the plan into conditioning, the sampler into batches.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

# Named boxes as (x0, y0, x1, y1) fractions of the frame, left/top = 0.
BOXES = {
    "full": (0.0, 0.0, 1.0, 1.0), "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0), "center": (0.25, 0.0, 0.75, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "left-third": (0.0, 0.0, 1 / 3, 1.0), "middle-third": (1 / 3, 0.0, 2 / 3, 1.0), "right-third": (2 / 3, 0.0, 1.0, 1.0),
}
BOXES["centre"] = BOXES["center"]
_NUMBER = r"\s*(\d*\.?\d+)\s*"
_FRACTIONS = re.compile(rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$")
NO_CHARACTER = "NC"
TAG = re.compile(r"\[([^\[\]]+)\]")
INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")  # zero-width and format characters
DESCRIPTION_START = re.compile(r"(a|an)\s", re.IGNORECASE)  # "[Lena] a woman ..." reads like a description


@dataclass(frozen=True)
class Frame:
    index: int
    prompt: str                     # with descriptions substituted and the style applied
    characters: tuple[str, ...]     # canonical names, in order of mention
    caption: str
    line: int                       # 1-based line in the story text
    reference: bool = False
    places: tuple = ()              # ((name, (x0, y0, x1, y1)), ...): layout boxes from [Name@place]


@dataclass
class StoryPlan:
    characters: dict[str, str]      # canonical name -> description
    frames: list[Frame]
    negative: str = ""
    references_per_character: int = 2
    notes: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # what later nodes attach (character masks, photos, routing)

    @property
    def captions(self) -> list[str]:
        return [f.caption for f in self.frames]

    def reference_indices(self) -> list[int]:
        return [f.index for f in self.frames if f.reference]

    def reader_indices(self) -> list[int]:
        return [f.index for f in self.frames if not f.reference]


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'left', 'top-right', ... or 'x0,y0,x1,y1' in fractions of the frame -> a box; ValueError(problem; fix)."""
    key = text.strip().lower()
    if key in BOXES:
        return BOXES[key]
    match = _FRACTIONS.match(key)
    if not match:
        raise ValueError(f"'@{text}' is not a place; write one of {', '.join(sorted(BOXES))} or four fractions "
                         "'x0,y0,x1,y1' between 0 and 1 (left, top, right, bottom), e.g. '@0.1,0.2,0.5,1'")
    x0, y0, x1, y1 = (float(g) for g in match.groups())
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"the box '@{text}' is outside the frame or empty; each fraction lies between 0 and 1, "
                         "with left < right and top < bottom")
    return x0, y0, x1, y1


def _fail(where: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"StoryKit Story Prompt: {where}: {problem}. {fix}")


def apply_style(template: str, prompt: str) -> str:
    """Put a frame prompt into a style template with a `{prompt}` slot (no slot: the style is appended)."""
    template = template.strip()
    if not template:
        return prompt
    if "{prompt}" in template:
        return template.replace("{prompt}", prompt)
    return f"{prompt}, {template}"


def split_caption(line: str) -> tuple[str, str]:
    """'body # caption' -> (body, caption) at the last '#' not written as '\\#'; '\\#' becomes a literal '#'."""
    cut = line.rfind("#")
    while cut > 0 and line[cut - 1] == "\\":
        cut = line.rfind("#", 0, cut - 1)
    body, caption = (line[:cut], line[cut + 1:]) if cut >= 0 else (line, "")
    return body.replace("\\#", "#").strip(), caption.replace("\\#", "#").strip()


def tag_name(tag: str) -> str:
    """The name of a tag '[Lena@left]' -> 'Lena' (the place after '@' is a layout box)."""
    return tag.partition("@")[0].strip()


def _check_tags(where: str, body: str) -> list[str]:
    """The [Name] tags of a line, stripped; a stray bracket or a blank or invisible name is an error."""
    tags = [t.strip() for t in TAG.findall(body)]
    rest = TAG.sub("", body)
    if "[" in rest or "]" in rest:
        raise _fail(where, "a '[' or ']' is not part of a [Name]",
                    "Names cannot contain brackets and descriptions cannot use them: remove the stray bracket.")
    for tag in tags:
        if not INVISIBLE.sub("", tag).strip():
            raise _fail(where, f"[{tag}] is a blank name", "Give the character a name, e.g. '[Lena]'.")
        if INVISIBLE.search(tag):
            raise _fail(where, f"the name [{INVISIBLE.sub('', tag)}] holds invisible characters (zero-width spaces)",
                        "Retype the name without them.")
    return tags


def parse_story(text: str, style: str = "", references_per_character: int = 2,
                reference_mode: str = "auto") -> StoryPlan:
    """Parse the story text; raise ValueError naming the line and the fix for every malformed part.

    reference_mode "auto": each character's first frames where it appears alone (then frames it shares) are its
    references. "first": the first `references_per_character` frames of the story are the references, as in the
    StoryDiffusion app; each must show a character. Time and memory are linear in the length of the text.
    """
    if references_per_character < 1:
        raise _fail("references", "needs at least 1 reference frame per character", "Set it to 1 or more.")
    characters: dict[str, str] = {}
    canonical: dict[str, str] = {}
    defined_on: dict[str, int] = {}
    frames: list[Frame] = []
    notes: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"line {number} ({line[:40]}{'...' if len(line) > 40 else ''})"
        body, caption = split_caption(line)
        tags = _check_tags(where, body)
        head = re.match(r"^\[([^\[\]]+)\]\s*(.*)$", body)
        if not frames and head and tag_name(head.group(1)).upper() != NO_CHARACTER \
                and tag_name(head.group(1)).lower() not in canonical:
            if "@" in head.group(1):
                raise _fail(where, f"the character line [{head.group(1).strip()}] has a place",
                            f"Places belong on frame lines ('[{tag_name(head.group(1))}@left] walks in'); write "
                            f"the character line as '[{tag_name(head.group(1))}] what they look like'.")
            name, description = head.group(1).strip(), head.group(2).strip()
            if not description:
                raise _fail(where, f"the character line [{name}] has no description",
                            f"Write what [{name}] looks like after the name, e.g. '[{name}] a man with a grey beard'.")
            if caption:
                raise _fail(where, f"the character line [{name}] has a caption ('# {caption}')",
                            "Captions belong on frame lines; remove the '#' part (write '\\#' for a literal '#').")
            if len(tags) > 1:
                raise _fail(where, f"the description of [{name}] contains [{tags[1]}]",
                            "A description says what the character looks like; it cannot name characters or [NC]. "
                            "Remove the tag.")
            canonical[name.lower()] = name
            characters[name] = description
            defined_on[name] = number
            continue
        names: dict[str, None] = {}
        places: dict[str, tuple] = {}
        no_character = False
        for tag in tags:
            key, _, place = (part.strip() for part in tag.partition("@"))
            if key.upper() == NO_CHARACTER:
                if place:
                    raise _fail(where, f"[{tag}]: [NC] has no place", "Write [NC] without '@...'.")
                no_character = True
                continue
            if key.lower() not in canonical:
                known = ", ".join(f"[{n}]" for n in list(characters)[:10]) or "none yet"
                raise _fail(where, f"the frame names [{key}], who has no character line",
                            f"Add a line '[{key}] description' before the first frame, or fix the name "
                            f"(characters: {known}{', ...' if len(characters) > 10 else ''}).")
            names.setdefault(canonical[key.lower()], None)
            if place:
                try:
                    box = parse_box(place)
                except ValueError as error:
                    raise _fail(where, f"[{tag}]: {error}", "Fix the place after '@' or remove it.") from None
                if places.setdefault(canonical[key.lower()], box) != box:
                    raise _fail(where, f"[{key}] has two different places", "Give each character one place a frame.")
        if no_character and names:
            raise _fail(where, "[NC] (no character) is on a frame that also names "
                        + ", ".join(f"[{n}]" for n in names), "Remove [NC] or the character names.")

        def substitute(match: re.Match) -> str:
            key = tag_name(match.group(1))
            return "" if key.upper() == NO_CHARACTER else characters[canonical[key.lower()]]

        prompt = re.sub(r"\s+", " ", TAG.sub(substitute, body)).strip(" ,")
        scene = re.sub(r"\s+", " ", TAG.sub("", body)).strip(" ,")
        if not scene and not names:
            raise _fail(where, "the frame is empty", "Describe what happens in it, or delete the line.")
        if not prompt:
            raise _fail(where, "the frame has no prompt", "Describe what happens in it, or delete the line.")
        if not frames and head and tag_name(head.group(1)).lower() in canonical and DESCRIPTION_START.match(scene):
            name = canonical[tag_name(head.group(1)).lower()]
            notes.append(f"line {number}: [{name}] is already described on line {defined_on[name]}, so this line is "
                         f"the first frame; if it was meant as {name}'s description, join it to line "
                         f"{defined_on[name]} (a character is described once)")
        frames.append(Frame(index=len(frames), prompt=apply_style(style, prompt), characters=tuple(names),
                            caption=caption, line=number, places=tuple(places.items())))
    if not frames:
        raise _fail("story", "there are no frame lines" if characters else "the story is empty",
                    "Write one frame per line after the character lines, e.g. '[Lena] reads a letter # Caption'.")
    mentioned = {name for f in frames for name in f.characters}
    unused = [n for n in characters if n not in mentioned]
    if unused:
        first = unused[0]
        raise _fail(f"line {defined_on[first]}", f"[{first}] has a character line but no frame mentions [{first}]",
                    f"Mention [{first}] in a frame, delete the line, or if line {defined_on[first]} was meant as a "
                    "frame, fix the name in it.")
    plan = StoryPlan(characters=characters, frames=frames, references_per_character=references_per_character,
                     notes=notes)
    plan.frames = _mark_references(plan, reference_mode, defined_on)
    return plan


def _mark_references(plan: StoryPlan, mode: str, defined_on: dict[str, int]) -> list[Frame]:
    count = plan.references_per_character
    chosen: set[int] = set()
    if mode == "first":
        for frame in plan.frames[:count]:
            if not frame.characters:
                raise _fail(f"line {frame.line}", f"frame {frame.index + 1} has no character but falls in the "
                            f"reference slots (the first {count} frames)",
                            "Move the [NC] frame later, or lower 'references per character'.")
            chosen.add(frame.index)
        in_references = {name for i in chosen for name in plan.frames[i].characters}
        for name in plan.characters:
            if name not in in_references:
                raise _fail(f"line {defined_on[name]}", f"[{name}] is in none of the first {count} frames, the "
                            f"reference frames", f"Move a frame showing [{name}] to the top, raise 'references per "
                            "character', or use the 'auto' reference mode.")
    elif mode == "auto":
        solo: dict[str, list[int]] = {name: [] for name in plan.characters}
        shared: dict[str, list[int]] = {name: [] for name in plan.characters}
        for f in plan.frames:
            for name in f.characters:
                (solo if len(f.characters) == 1 else shared)[name].append(f.index)
        for name in plan.characters:
            picked = (solo[name] + shared[name])[:count]
            if len(solo[name]) < count:
                plan.notes.append(f"[{name}] appears alone in {len(solo[name])} frame(s); "
                                  f"{len(picked) - min(len(solo[name]), count)} shared frame(s) used as references")
            chosen.update(picked)
    else:
        raise _fail("reference mode", f"unknown mode {mode!r}", "Use 'auto' or 'first'.")
    return [dataclasses.replace(f, reference=f.index in chosen) for f in plan.frames]


def parse_frames(text: str, plan: StoryPlan, where: str) -> tuple[int, ...]:
    """'2, 4-6' (1-based story frame numbers) -> frame indices; '' -> (); errors name `where` and the range."""
    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"{where}: {part!r} is not a frame number or range; write e.g. '2, 4-6'") from None
        if not 1 <= lo <= hi <= len(plan.frames):
            raise ValueError(f"{where}: frames {part!r} is outside the story; it has frames 1-{len(plan.frames)}")
        chosen.extend(i - 1 for i in range(lo, hi + 1) if i - 1 not in chosen)
    return tuple(chosen)


def parse_layout(text: str, plan: StoryPlan, node: str) -> tuple:
    """A layout input: one line per frame, 'FRAME: [Name@place], [Name@place]' (frame numbers 1-based as in the
    preview) -> ((frame index, name, box), ...). Errors name the line and the fix."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{node}: layout line {number} ({line[:40]})"
        head, colon, body = line.partition(":")
        if not colon:
            raise ValueError(f"{where}: write 'FRAME: [Name@place], ...', e.g. '4: [Lena@left], [Bob@right]'")
        frames = parse_frames(head, plan, where)
        tags = [t.strip() for t in TAG.findall(body)]
        if not tags or TAG.sub("", body).strip(" ,"):
            raise ValueError(f"{where}: after the frame number write [Name@place] tags only, e.g. "
                             "'[Lena@left], [Bob@right]'")
        for tag in tags:
            name, at, place = (p.strip() for p in tag.partition("@"))
            if not at:
                raise ValueError(f"{where}: [{tag}] has no place; write [{name}@left] or [{name}@x0,y0,x1,y1]")
            try:
                box = parse_box(place)
            except ValueError as error:
                raise ValueError(f"{where}: [{tag}]: {error}") from None
            for index in frames:
                frame = plan.frames[index]
                match = next((c for c in frame.characters if c.lower() == name.lower()), None)
                if match is None:
                    who = ", ".join(f"[{c}]" for c in frame.characters) or "no character"
                    raise ValueError(f"{where}: frame {index + 1} (story line {frame.line}) does not show "
                                     f"[{name}] (it shows {who}); name a character of that frame")
                out.append((index, match, box))
    return tuple(out)
