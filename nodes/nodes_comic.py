"""Comic pages from story frames and their captions (StoryDiffusion's comic typesetting, as one node)."""
from __future__ import annotations

import numpy as np
import torch
from .v3 import io
from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..kernels import layout as lay

NODE = "StoryKit Comic Layout"


def parse_color(value: str, name: str) -> tuple[float, float, float]:
    try:
        r, g, b = ImageColor.getrgb(value.strip())[:3]
    except ValueError as exc:
        raise ValueError(f"{NODE}: {name} {value!r} is not a colour; write it as #rrggbb or a name such as white") from exc
    return (r / 255.0, g / 255.0, b / 255.0)


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\\n"):
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if not line or draw.textlength(trial, font=font) <= width:
                line = trial
            else:
                lines.append(line)
                line = word
        if line:
            lines.append(line)
    return lines


def draw_captions(page: Image.Image, panels: list[lay.Panel], captions: list[str], mode: str, font_size: int,
                  text_rgb, box_rgb) -> None:
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=font_size)
    pad = max(4, font_size // 3)
    for p in panels:
        text = captions[p.frame] if p.frame < len(captions) else ""
        if not text:
            continue
        lines = wrap(draw, text, font, p.w - 2 * pad)
        line_h = round(font_size * 1.25)
        if mode == "below":
            y = p.caption_y + pad
        else:  # overlay: a box at the panel's foot, as narration boxes sit in comics
            box_h = line_h * len(lines) + 2 * pad
            y0 = p.y + p.h - box_h - pad
            draw.rectangle([p.x + pad, y0, p.x + p.w - pad, y0 + box_h], fill=box_rgb, outline=text_rgb, width=2)
            y = y0 + pad
        for line in lines:
            width = draw.textlength(line, font=font)
            draw.text((p.x + (p.w - width) / 2, y), line, fill=text_rgb, font=font)
            y += line_h


class ComicLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitComicLayout",
            display_name=NODE,
            category="StoryKit/story",
            description="Lays story frames out as comic pages, with each frame's caption below it or in a narration "
                        "box. All pages of one run have the same size, so they come out as one IMAGE batch.",
            inputs=[
                io.Image.Input("frames", tooltip="The story's frames, in reading order (an IMAGE batch)."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="One caption per line, frame by frame (a Story Prompt node's captions "
                                        "output fits here). An empty line leaves that frame without a caption."),
                io.Combo.Input("layout", options=list(lay.LAYOUTS), default="classic",
                               tooltip="classic: rows of two panels alternating with one wide panel. grid: square "
                                       "grid. four-panel: 2x2 pages. strip: one row per page. webtoon: one column."),
                io.Int.Input("panels_per_page", default=0, min=0, max=64,
                             tooltip="Frames per page; 0 uses the layout's own (classic 5, grid 9, four-panel 4, "
                                     "strip 4, webtoon 4)."),
                io.Int.Input("page_width", default=1536, min=256, max=8192, step=8,
                             tooltip="Width of each page in pixels; the height follows from the frames' shape."),
                io.Int.Input("margin", default=32, min=0, max=512, tooltip="Empty border around the page, pixels."),
                io.Int.Input("gutter", default=16, min=0, max=512, tooltip="Space between panels, pixels."),
                io.Int.Input("border", default=4, min=0, max=64, tooltip="Panel outline thickness, pixels (0: none)."),
                io.Combo.Input("caption_mode", options=["below", "overlay", "none"], default="below",
                               tooltip="below: a text band under each panel. overlay: a narration box inside the "
                                       "panel's foot. none: no text."),
                io.Int.Input("font_size", default=28, min=8, max=256, tooltip="Caption text size, pixels."),
                io.String.Input("background", default="#ffffff", tooltip="Page colour, #rrggbb or a colour name."),
                io.String.Input("ink", default="#111111", tooltip="Colour of borders and caption text."),
            ],
            outputs=[io.Image.Output(display_name="pages")],
        )

    @classmethod
    def execute(cls, frames, layout, panels_per_page, page_width, margin, gutter, border, caption_mode, font_size,
                background, ink, captions="") -> io.NodeOutput:
        if frames.shape[0] == 0:
            raise ValueError(f"{NODE}: frames is an empty batch; connect the images of the story")
        bg, ink_rgb = parse_color(background, "background"), parse_color(ink, "ink")
        caption_list = [line.strip() for line in (captions or "").splitlines()]
        if caption_mode == "none" or not any(caption_list):
            caption_mode, caption_list = "none", []
        lines_needed = 3 if caption_mode == "below" else 0
        band = round(font_size * 1.25) * lines_needed + max(4, font_size // 3) * 2 if lines_needed else 0
        pages_rows = lay.row_counts(frames.shape[0], layout, panels_per_page)
        height, layouts = lay.page_geometry(pages_rows, frames.shape[1], frames.shape[2], page_width, margin,
                                            gutter, band, layout)
        pages = lay.compose_pages(frames[..., :3].float().cpu(), height, page_width, layouts, bg, border, ink_rgb)
        if caption_mode != "none":
            drawn = []
            for page, panels in zip(pages, layouts, strict=True):
                img = Image.fromarray((page.numpy() * 255).round().astype(np.uint8))
                draw_captions(img, panels, caption_list, caption_mode, font_size,
                              tuple(round(c * 255) for c in ink_rgb), tuple(round(c * 255) for c in bg))
                drawn.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
            pages = torch.stack(drawn)
        return io.NodeOutput(pages)


NODES = [ComicLayout]
