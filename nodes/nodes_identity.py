"""Identity routing as nodes: several characters in one frame, masks per character, a photo as a character.

Each node takes the Story Prompt's story and returns a copy with something attached; the Story Sampler reads it.
"""
from __future__ import annotations

import torch
from .v3 import io

from ..kernels import story_plan
from . import routing
from .nodes_consistent_attention import Story

ROUTING_NODE = "StoryKit Identity Routing"
MASK_NODE = "StoryKit Character Mask"
PHOTO_NODE = "StoryKit Character Photo"
PHOTO_USES = ("photo and generated references", "photo only")


class IdentityRouting(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitIdentityRouting",
            display_name="Identity Routing (several characters)",
            category="StoryKit/consistent attention",
            description="Bounded sharing: a character's tokens attend, beyond their own frame, only to the same "
                        "character's tokens in the other frames and the bank, so two characters in one frame "
                        "keep their own faces, hair and clothes. Who is where comes from masks, layout boxes "
                        "([Lena@left] in the story or the layout below) or the model's own attention.",
            inputs=[
                Story.Input("story", tooltip="The story plan from the Story Prompt (or another StoryKit node)."),
                io.Combo.Input("mode", options=list(routing.MODES), default="auto",
                               tooltip="auto: bounded where a frame has several characters or a mask, box or "
                                       "photo (single-character frames share as plain CSA does). every frame: "
                                       "masks in every frame (backgrounds never pass as the character). off: "
                                       "plain CSA everywhere."),
                io.Combo.Input("background", options=["share with background", "own frame only"],
                               default="share with background",
                               tooltip="What background tokens read from the other frames: their background "
                                       "tokens (a steadier setting), or nothing."),
                io.String.Input("layout", multiline=True, default="", dynamic_prompts=False,
                                tooltip="Optional boxes per frame, one line each: 'FRAME: [Name@place], ...', "
                                        "e.g. '4: [Lena@left], [Bob@right]' (frame numbers as in the preview; "
                                        "places: left, right, top, bottom, center, top-left, ..., "
                                        "left-third, or x0,y0,x1,y1 fractions)."),
            ],
            outputs=[Story.Output(display_name="story")],
        )

    @classmethod
    def execute(cls, story, mode, background, layout="") -> io.NodeOutput:
        plan: story_plan.StoryPlan = story
        places = story_plan.parse_layout(layout, plan, ROUTING_NODE)
        options = routing.RoutingOptions(mode, background.startswith("share"), places)
        return io.NodeOutput(routing.with_extra(plan, "routing", options, append=False))


class CharacterMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitCharacterMask",
            display_name="Character Mask",
            category="StoryKit/consistent attention",
            description="Where one character is in some frames, as a MASK (painted in the mask editor, or from any "
                        "segmentation node). Those frames share that character's tokens only inside the mask.",
            inputs=[
                Story.Input("story", tooltip="The story plan from the Story Prompt (or another StoryKit story node)."),
                io.String.Input("character", default="", tooltip="The character's name, as in its [Name] line."),
                io.Mask.Input("mask", tooltip="One mask for every listed frame, or one per listed frame (a batch), "
                                              "at the frames' size (another size of the same shape is resized)."),
                io.String.Input("frames", default="",
                                tooltip="Frame numbers, e.g. '4' or '2, 4-6' (as in the preview). Empty: every "
                                        "frame that shows the character."),
            ],
            outputs=[Story.Output(display_name="story")],
        )

    @classmethod
    def execute(cls, story, character, mask, frames="") -> io.NodeOutput:
        plan: story_plan.StoryPlan = story
        name = routing.check_character(plan, character, MASK_NODE)
        indices = story_plan.parse_frames(frames, plan, f"{MASK_NODE}: frames")
        for index in indices:
            if name not in plan.frames[index].characters:
                raise ValueError(f"{MASK_NODE}: frames: frame {index + 1} (story line {plan.frames[index].line}) "
                                 f"does not show [{name}]; list only frames with [{name}]")
        targets = len(indices) or sum(name in f.characters for f in plan.frames)
        mask = mask if mask.ndim == 3 else mask[None]
        if mask.shape[0] not in (1, targets):
            raise ValueError(f"{MASK_NODE}: mask has {mask.shape[0]} masks for {targets} frames of [{name}]; give "
                             "one mask, or one per frame")
        if float(mask.max()) <= 0:
            raise ValueError(f"{MASK_NODE}: the mask of [{name}] is empty; paint where [{name}] is")
        return io.NodeOutput(routing.with_extra(plan, "masks", routing.CharacterMask(name, mask.float(), indices)))


class CharacterPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitCharacterPhoto",
            display_name="Character Photo",
            category="StoryKit/consistent attention",
            description="A real photo as a character's reference, without training: at every step the photo, "
                        "noised to that step, runs through the model beside the reference frames and writes its "
                        "(masked) tokens to the bank, so the story's frames read the real person.",
            inputs=[
                Story.Input("story", tooltip="The story plan from the Story Prompt (or another StoryKit story node)."),
                io.Vae.Input("vae", tooltip="The VAE of the story's model (encodes the photo)."),
                io.String.Input("character", default="", tooltip="The character's name, as in its [Name] line."),
                io.Image.Input("image", tooltip="One photo, or several (a batch): each becomes a reference."),
                io.Combo.Input("use", options=list(PHOTO_USES), default=PHOTO_USES[0],
                               tooltip="photo and generated references: the character's first frames are still "
                                       "generated together as references. photo only: the photo is the only "
                                       "reference; every frame of the character reads it."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the person is in the photo (e.g. from LoadImage's alpha or a "
                                      "segmentation node). Without: from the model's attention to the "
                                      "character's description."),
            ],
            outputs=[Story.Output(display_name="story")],
        )

    @classmethod
    def execute(cls, story, vae, character, image, use, mask=None) -> io.NodeOutput:
        plan: story_plan.StoryPlan = story
        name = routing.check_character(plan, character, PHOTO_NODE)
        if image.ndim != 4 or image.shape[0] < 1:
            raise ValueError(f"{PHOTO_NODE}: image must be an IMAGE batch [B, H, W, C]")
        masks = None
        if mask is not None:
            masks = mask if mask.ndim == 3 else mask[None]
            if masks.shape[0] not in (1, image.shape[0]):
                raise ValueError(f"{PHOTO_NODE}: {masks.shape[0]} masks for {image.shape[0]} photos; give one mask "
                                 "or one per photo")
        for n in range(image.shape[0]):
            photo_mask = None if masks is None else masks[min(n, masks.shape[0] - 1)]
            if photo_mask is not None and tuple(photo_mask.shape) != tuple(image.shape[1:3]):
                photo_mask = routing.fit_mask(photo_mask, image.shape[1], image.shape[2], f"{PHOTO_NODE}: mask")
            plan = routing.with_extra(plan, "photos", routing.Photo(name, image[n], photo_mask, vae,
                                                                    use == "photo only"))
        return io.NodeOutput(plan)


class RoutingOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitRoutingOverlay",
            display_name="Routing Overlay",
            category="StoryKit/consistent attention",
            description="The Story Sampler's routing picture blended over the decoded frames: one colour per "
                        "character, grey where nothing was shared.",
            inputs=[
                io.Image.Input("images", tooltip="The decoded frames."),
                io.Image.Input("routing", tooltip="The Story Sampler's routing output."),
                io.Float.Input("opacity", default=0.45, min=0.0, max=1.0, step=0.05,
                               tooltip="How strongly the colours cover the frames (0: frames only, 1: colours only)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, images, routing, opacity) -> io.NodeOutput:
        if images.shape[0] != routing.shape[0]:
            raise ValueError(f"StoryKit Routing Overlay: {images.shape[0]} images but {routing.shape[0]} routing "
                             "pictures; connect the frames decoded from the same Story Sampler")
        colours = torch.nn.functional.interpolate(routing.permute(0, 3, 1, 2), size=images.shape[1:3],
                                                  mode="nearest").permute(0, 2, 3, 1).to(images)
        return io.NodeOutput(images[..., :3] * (1 - opacity) + colours * opacity)


NODES = [IdentityRouting, CharacterMask, CharacterPhoto, RoutingOverlay]
