"""Comic page layout: which frame goes in which panel, panel rectangles, and pasting frames into pages (plain torch).

Images are ComfyUI's [B, H, W, C] floats in 0..1. Captions are drawn by the node (text is not tensor work).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows per page, as panel counts per row. "classic" alternates two panels and one wide panel, as comic pages do.
LAYOUTS = ("classic", "grid", "four-panel", "strip", "webtoon")


@dataclass(frozen=True)
class Panel:
    frame: int
    x: int
    y: int
    w: int
    h: int
    caption_y: int  # top of the caption band (== y + h when captions are drawn below, else the panel's own box)


def row_counts(n_frames: int, layout: str, per_page: int = 0) -> list[list[int]]:
    """Split n frames into pages of rows; each row lists how many panels it holds."""
    if n_frames < 1:
        raise ValueError("a comic needs at least one frame")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    default = {"classic": 5, "grid": 9, "four-panel": 4, "strip": 4, "webtoon": 4}[layout]
    per_page = per_page or default
    pages = []
    for start in range(0, n_frames, per_page):
        count = min(per_page, n_frames - start)
        if layout == "classic":
            rows, left, pattern = [], count, 0
            while left:
                take = min(left, 2 if pattern % 2 == 0 else 1)
                rows.append(take)
                left -= take
                pattern += 1
        elif layout in ("grid", "four-panel"):
            cols = 2 if layout == "four-panel" else max(1, math.ceil(math.sqrt(per_page)))
            rows = [min(cols, count - i) for i in range(0, count, cols)]
        elif layout == "strip":
            rows = [count]
        else:  # webtoon: one panel a row, read top to bottom
            rows = [1] * count
        pages.append(rows)
    return pages


def page_geometry(pages: list[list[int]], frame_h: int, frame_w: int, page_width: int, margin: int, gutter: int,
                  caption_height: int, layout: str) -> tuple[int, list[list[Panel]]]:
    """Panel rectangles for every page and the common page height (pages of one batch share a size)."""
    widest = max(max(rows) for rows in pages)
    cols_for_height = widest if layout in ("strip", "grid", "four-panel") else (1 if layout == "webtoon" else 2)
    base_w = (page_width - 2 * margin - (cols_for_height - 1) * gutter) / cols_for_height
    if base_w < 8:
        raise ValueError(f"page width {page_width} is too narrow for {cols_for_height} panels with these margins")
    row_h = max(8, round(base_w * frame_h / frame_w))
    height = 0
    layouts: list[list[Panel]] = []
    frame = 0
    for rows in pages:
        y = margin
        panels = []
        for count in rows:
            panel_w = (page_width - 2 * margin - (count - 1) * gutter) / count
            for col in range(count):
                x = margin + col * (panel_w + gutter)
                panels.append(Panel(frame, round(x), y, round(panel_w), row_h, y + row_h))
                frame += 1
            y += row_h + caption_height + gutter
        height = max(height, y - gutter + margin)
        layouts.append(panels)
    return height, layouts


def cover_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale [H, W, C] to cover (height, width) and centre-crop, the way comic panels crop a picture."""
    h, w = image.shape[0], image.shape[1]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    chw = image.permute(2, 0, 1).unsqueeze(0)
    if (new_h, new_w) != (h, w):
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return chw[0, :, top:top + height, left:left + width].permute(1, 2, 0).clamp(0, 1)


def compose_pages(frames: torch.Tensor, page_height: int, page_width: int, layouts: list[list[Panel]],
                  background: tuple[float, float, float], border: int, border_color: tuple[float, float, float]
                  ) -> torch.Tensor:
    """Paste each frame into its panel (with a border drawn inside the panel edge) -> [pages, H, W, 3]."""
    channels = frames.shape[-1]
    bg = torch.tensor(background[:channels], dtype=frames.dtype, device=frames.device)
    line = torch.tensor(border_color[:channels], dtype=frames.dtype, device=frames.device)
    pages = bg.expand(len(layouts), page_height, page_width, channels).clone()
    for index, panels in enumerate(layouts):
        for p in panels:
            tile = cover_resize(frames[p.frame], p.h, p.w)
            pages[index, p.y:p.y + p.h, p.x:p.x + p.w] = tile
            if border > 0:
                b = min(border, p.w // 4, p.h // 4)
                region = pages[index, p.y:p.y + p.h, p.x:p.x + p.w]
                region[:b], region[-b:], region[:, :b], region[:, -b:] = line, line, line, line
    return pages
