"""Identity routing on the host's side: a story's masks, boxes and photos -> the run's Routing and photo rows.

The nodes (nodes_identity.py) attach what the user gives to a copy of the story plan (`plan.extras`): routing
options, per-character MASKs, photos. The Story Sampler calls `prepare` once per story: it adds one frame per photo
(a reference that is never denoised: its input is the photo noised to each step's sigma, see `photo_wrapper`),
turns photo-only characters' generated frames into readers, and builds the Routing that bounded sharing reads.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from ..kernels import identity_routing as ident
from ..kernels import layout
from ..kernels import story_plan
from . import attention_sites as sites

log = logging.getLogger("storykit")

WRAPPER_KEY = "storykit_photo_reference"
MODES = ("auto", "every frame", "off")


@dataclass(frozen=True)
class RoutingOptions:
    mode: str = "auto"                  # auto: bounded where a frame has several characters or a mask/box/photo
    share_background: bool = True
    places: tuple = ()                  # ((frame index, name, box), ...) from the routing node's layout input


@dataclass(frozen=True)
class CharacterMask:
    name: str
    mask: torch.Tensor                  # [B, H, W] in 0..1: one for every frame, or one per listed frame
    frames: tuple                       # story frame indices it applies to, () = every frame with the character


@dataclass(frozen=True)
class Photo:
    name: str
    image: torch.Tensor                 # [H, W, C] in 0..1
    mask: torch.Tensor | None           # [H, W] in 0..1, or None: automatic
    vae: object
    only: bool                          # True: the photo is the character's only reference


@dataclass
class Prepared:
    """What the Story Sampler samples: the story's frames and the photo frames after them."""
    frames: list                        # story_plan.Frame for every row the sampler may run (photos appended)
    photos: dict = field(default_factory=dict)   # frame index -> Photo
    routing: ident.Routing | None = None
    cond_row: dict = field(default_factory=dict)  # frame index -> the conditioning row it uses

    def plan_of(self, plan: story_plan.StoryPlan) -> story_plan.StoryPlan:
        return dataclasses.replace(plan, frames=self.frames)


def with_extra(plan: story_plan.StoryPlan, key: str, value, append: bool = True) -> story_plan.StoryPlan:
    """A copy of the plan with something attached (never change a node's cached output in place)."""
    extras = dict(plan.extras)
    extras[key] = (*extras.get(key, ()), value) if append else value
    return dataclasses.replace(plan, extras=extras)


def check_character(plan: story_plan.StoryPlan, name: str, node: str, field_name: str = "character") -> str:
    """The canonical name of a character of the story, or an error listing them."""
    for known in plan.characters:
        if known.lower() == name.strip().lower():
            return known
    names = ", ".join(plan.characters) or "none"
    raise ValueError(f"{node}: {field_name} {name!r} is not a character of the story (characters: {names}); "
                     "write the name as in its [Name] line")


def fit_mask(mask: torch.Tensor, height: int, width: int, where: str) -> torch.Tensor:
    """A [H, W] mask at the frame's size in pixels: resized with a note when the aspect ratio agrees, an error
    when it does not (a mask painted for another picture)."""
    if tuple(mask.shape) == (height, width):
        return mask.float()
    if ident.aspect_differs(tuple(mask.shape), (height, width)):
        raise ValueError(f"{where}: the mask is {mask.shape[1]}x{mask.shape[0]} but the frames are {width}x{height} "
                         "(another aspect ratio); paint or crop the mask at the frames' size")
    log.info("%s: the %dx%d mask is resized to the frames' %dx%d", where, mask.shape[1], mask.shape[0], width,
             height)
    return ident.resize(mask, (height, width))


def prepare(plan: story_plan.StoryPlan, latent_shape, ratio: int) -> Prepared:
    """Photo frames, reference roles and the Routing of one story run (None when nothing is bounded)."""
    options: RoutingOptions = plan.extras.get("routing") or RoutingOptions()
    frames = list(plan.frames)
    photos: dict[int, Photo] = {}
    titles: dict[int, str] = {}  # how warnings name the photo frames
    cond_row = {f.index: f.index for f in frames}
    only = {p.name for p in plan.extras.get("photos", ()) if p.only}
    if only:  # the photo is the character's identity: its generated frames read, none writes
        frames = [dataclasses.replace(f, reference=False) if f.characters and set(f.characters) <= only else f
                  for f in frames]
    for photo in plan.extras.get("photos", ()):
        source = next(f for f in plan.frames if photo.name in f.characters)  # its description's conditioning
        index = len(frames)
        frames.append(story_plan.Frame(index=index, prompt=source.prompt, characters=(photo.name,),
                                       caption="", line=source.line, reference=True))
        photos[index] = photo
        titles[index] = f"the photo of {photo.name}"
        cond_row[index] = source.index
    if options.mode == "off":
        return Prepared(frames, photos, None, cond_row)
    height, width = latent_shape[-2] * ratio, latent_shape[-1] * ratio
    masks: dict[tuple[int, str], torch.Tensor] = {}
    for given in plan.extras.get("masks", ()):
        targets = given.frames or tuple(f.index for f in plan.frames if given.name in f.characters)
        for n, frame in enumerate(targets):
            mask = given.mask[n if given.mask.shape[0] > 1 else 0]
            masks[(frame, given.name)] = fit_mask(mask, height, width, f"StoryKit Character Mask ({given.name})")
    places = {(i, name): box for i, name, box in options.places}
    places.update({(f.index, name): box for f in plan.frames for name, box in f.places})
    tokens = plan.extras.get("tokens", {})
    routing = ident.Routing(list(plan.characters), options.share_background)
    routing.titles = titles
    for frame in frames:
        given, sources = {}, {}
        for name in frame.characters:
            if (frame.index, name) in masks:
                given[name], sources[name] = masks[(frame.index, name)], "mask"
            elif (frame.index, name) in places:
                given[name], sources[name] = ident.box_mask(places[(frame.index, name)], height, width), "box"
        bounded = options.mode == "every frame" and bool(frame.characters)
        if frame.index in photos:
            photo = photos[frame.index]
            if photo.mask is not None:
                mask = fit_mask(photo.mask, photo.image.shape[0], photo.image.shape[1], "StoryKit Character Photo")
                mask = layout.cover_resize(mask[..., None], height, width)[..., 0]
                if float(mask.max()) <= 0.0:
                    log.warning("StoryKit Character Photo: the mask of %s's photo is empty; the whole photo is "
                                "shared as %s (plain sharing)", photo.name, photo.name)
                else:
                    given[photo.name], sources[photo.name] = mask, "photo mask"
            bounded = bounded or bool(given) or bool(tokens)  # automatic: the maps of its description
        routing.add_frame(frame.index, frame.characters, given, sources, bounded,
                          tokens.get(cond_row[frame.index], {}))
    return Prepared(frames, photos, routing if routing.bounded() else None, cond_row)


def photo_latents(prepared: Prepared, latent_shape, ratio: int) -> dict[int, torch.Tensor]:
    """Each photo VAE-encoded at the frames' size (cover-resized and centre-cropped as comic panels are)."""
    out = {}
    height, width = latent_shape[-2] * ratio, latent_shape[-1] * ratio
    for index, photo in prepared.photos.items():
        pixels = layout.cover_resize(photo.image[..., :3].float(), height, width)[None]
        with torch.no_grad():  # the VAE's weights may be inference tensors (the executor loads under inference mode)
            latent = photo.vae.encode(pixels)
        if tuple(latent.shape[1:]) != tuple(latent_shape[1:]):
            raise ValueError(f"StoryKit Character Photo: {photo.name}'s photo encodes to a latent of shape "
                             f"{tuple(latent.shape[1:])} but the story's latents are {tuple(latent_shape[1:])}; "
                             "connect the VAE of the story's model")
        out[index] = latent
    return out


def photo_wrapper(state, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                  transformer_options={}, **kwargs):  # noqa: B006 - host signature
    """APPLY_MODEL wrapper: photo rows get the photo noised to this call's sigma (fixed noise), whatever the
    sampler made of them, so the photo writes the bank at every step like a reference frame."""
    rows = state.photo_inputs
    sigma = sites.sigma_of(transformer_options)
    if rows and sigma is not None:
        sampling = state.model_sampling
        x = x.clone()
        halves = sites.halves_of(transformer_options, x.shape[0])
        for _, part in halves:
            for row, (latent, noise) in rows.items():
                target = part.start + row
                if target < part.stop:
                    s = torch.full((1,), sigma, dtype=x.dtype, device=x.device)
                    x[target] = sampling.noise_scaling(s, noise.to(x), latent.to(x))[0]
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def routing_pictures(routing: ident.Routing | None, names: list[str], frames: list, latent_shape,
                     ratio: int) -> torch.Tensor:
    """[F, H, W, 3] colour maps of who is where in each story frame (the latent grid, scaled to pixels): one colour
    per character, black background, grey unknown (not shared). Without routing a frame is its first character."""
    grid = (latent_shape[-2], latent_shape[-1])
    pictures = []
    for frame in frames:
        if routing is not None:
            labels = routing.labels(frame.index, grid)
        else:
            label = names.index(frame.characters[0]) + 1 if frame.characters else ident.BACKGROUND
            labels = torch.full((grid[0] * grid[1],), label, dtype=torch.long)
        pictures.append(ident.colour_labels(labels, grid))
    stack = torch.stack(pictures).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(stack, scale_factor=ratio, mode="nearest").permute(0, 2, 3, 1)
