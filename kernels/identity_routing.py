"""Identity routing: which image tokens of a frame belong to which character, so that consistent self-attention
shares a character's tokens only with that character (bounded sharing, after StoryBooth and ConsiStory).

A frame's tokens get labels on the attention call's token grid: 1.. a character (its id in the story), 0 the
background, -1 unknown (not shared: the token attends within its own frame only). Labels come from masks of three
sources, per character: a user MASK, a layout box ("[Lena@left]"), or the model's own text-to-image attention
(automatic: gathered over the steps, smoothed, thresholded with Otsu's method as ConsiStory does). A frame with one
character and no mask source is that character everywhere (plain CSA's sharing). Plain torch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .story_plan import BOXES, parse_box  # noqa: F401 - the layout syntax lives with the story syntax

BACKGROUND, UNKNOWN = 0, -1
log = logging.getLogger("storykit")
PALETTE = ((0.95, 0.30, 0.25), (0.20, 0.55, 0.95), (0.30, 0.80, 0.35), (0.95, 0.75, 0.15), (0.70, 0.35, 0.90),
           (0.10, 0.80, 0.80), (0.95, 0.45, 0.75), (0.60, 0.45, 0.25))
BACKGROUND_COLOUR, UNKNOWN_COLOUR = (0.0, 0.0, 0.0), (0.45, 0.45, 0.45)


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """A [height, width] 0/1 mask of a box in fractions (every cell whose centre lies inside it)."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    inside_y = (ys >= y0) & (ys < y1)
    inside_x = (xs >= x0) & (xs < x1)
    return (inside_y[:, None] & inside_x[None, :]).float()


def resize(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A [H, W] map on a token grid (h, w): area averages when shrinking (a token's share of the mask), bilinear
    when growing."""
    mask = mask.float()
    if tuple(mask.shape) == tuple(grid):
        return mask
    image = mask[None, None]
    if grid[0] <= mask.shape[0] and grid[1] <= mask.shape[1]:
        return F.adaptive_avg_pool2d(image, grid)[0, 0]
    return F.interpolate(image, size=grid, mode="bilinear", align_corners=False)[0, 0]


def aspect_differs(shape: tuple[int, int], grid: tuple[int, int], tolerance: float = 0.02) -> bool:
    """Whether a mask's aspect ratio differs from the frame's by more than `tolerance` (relative)."""
    return abs(math.log((shape[1] / shape[0]) / (grid[1] / grid[0]))) > tolerance


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    values = values.float().flatten().clamp(0, 1)
    hist = torch.histc(values, bins=bins, min=0.0, max=1.0)
    prob = hist / hist.sum().clamp(min=1)
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    weight = prob.cumsum(0)
    mean = (prob * centres).cumsum(0)
    between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight)).clamp(min=1e-12)
    between[weight >= 1 - 1e-9] = 0
    best = (between >= between.max() * (1 - 1e-6)).nonzero().flatten()  # the middle of a flat optimum
    return float((best[0] + best[-1]).item() / 2 + 1) / bins


def smooth(map_: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur of a [h, w] map (sigma in cells), edges replicated."""
    if sigma <= 0:
        return map_
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma ** 2))
    taps = (taps / taps.sum()).to(map_.dtype)
    image = F.pad(map_[None, None], (radius, radius, radius, radius), mode="replicate")
    image = F.conv2d(image, taps.view(1, 1, 1, -1))
    return F.conv2d(image, taps.view(1, 1, -1, 1))[0, 0]


def normalise(map_: torch.Tensor) -> torch.Tensor:
    low, high = map_.min(), map_.max()
    return (map_ - low) / (high - low) if float(high - low) > 1e-12 else torch.zeros_like(map_)


def text_attention_maps(q: torch.Tensor, k_text: torch.Tensor, columns: list[torch.Tensor], heads_first: bool,
                        n_heads: int = 0, budget_bytes: int = 16 << 20) -> torch.Tensor:
    """Cross-attention maps of some text tokens (Prompt-to-Prompt's, as ConsiStory gathers them): per column set,
    softmax(q k^T / sqrt(d)) over all L text tokens, averaged over heads, summed over the set's columns.

    q: one row's image-token queries [N, H * D] (or [H, N, D] heads first), k_text: its text keys [L, H * D]
    ([H, L, D]); columns: LongTensors of text positions (one set per character). Returns [len(columns), N] float32.
    The softmax is the host's fused one over all L (its normaliser needs every logit); queries go in chunks so
    no [H, chunk, L] block exceeds `budget_bytes`; the columns are summed by one matmul with a 0/1 assignment."""
    if not heads_first:
        heads = max(n_heads, 1)
        q = q.reshape(q.shape[0], heads, -1).transpose(0, 1)
        k_text = k_text.reshape(k_text.shape[0], heads, -1).transpose(0, 1)
    heads, n, dim = q.shape
    length = k_text.shape[1]
    assign = torch.zeros(length, len(columns), dtype=torch.float32)
    for i, c in enumerate(columns):
        c = c.to(torch.long).flatten().cpu()
        assign[c[(c >= 0) & (c < length)], i] = 1.0
    out = torch.empty(len(columns), n, dtype=torch.float32, device=q.device)
    assign = assign.to(q.device)
    keys = k_text.float().transpose(1, 2) * dim ** -0.5
    step = max(1, budget_bytes // max(1, heads * length * 4))
    for start in range(0, n, step):
        probs = torch.matmul(q[:, start:start + step].float(), keys).softmax(dim=-1).mean(0)  # [n, L]
        out[:, start:start + step] = (probs @ assign).transpose(0, 1)
    return out


def labels_from_masks(masks: dict[int, torch.Tensor], grid: tuple[int, int], rest: int,
                      threshold: float = 0.5) -> torch.Tensor:
    """Token labels [h * w] from character masks (label -> [H, W] in 0..1): a token takes the label whose mask
    covers it most, if above `threshold`; the others get `rest` (BACKGROUND, or UNKNOWN while a character of the
    frame has no mask yet)."""
    labels = torch.full((grid[0] * grid[1],), rest, dtype=torch.long)
    if not masks:
        return labels
    ids = torch.tensor(list(masks), dtype=torch.long)
    stack = torch.stack([resize(m, grid).flatten() for m in masks.values()])
    value, best = stack.max(dim=0)
    return torch.where(value > threshold, ids[best], labels)


@dataclass
class FrameRoute:
    """What is known about the characters of one frame: their ids, given masks (user or box) and automatic maps."""
    characters: tuple[int, ...]
    given: dict[int, torch.Tensor] = field(default_factory=dict)   # character id -> [H, W] in 0..1
    sources: dict[int, str] = field(default_factory=dict)          # character id -> "mask" | "box" | "photo mask"
    bounded: bool = False
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # character id -> its text-token positions


class Routing:
    """The routes of one story run: per frame, which tokens are whose; automatic maps gathered as sampling goes.

    `labels(frame, grid)` gives the token labels a CSA call uses; `add_map` takes one character's text-to-image
    attention map of one call (any grid); maps of a step are folded into the running mask when the step changes
    (`at_sigma`), so a step reads the masks of the steps before it. `auto_until`: the sigma below which automatic
    masks stop changing (the layout is set by then).
    """

    def __init__(self, names: list[str], share_background: bool = True, threshold: float = 0.5,
                 blur: float = 1.0, auto_until: float | None = None):
        self.names = list(names)
        self.ids = {name: i + 1 for i, name in enumerate(self.names)}
        self.share_background, self.threshold, self.blur, self.auto_until = \
            share_background, threshold, blur, auto_until
        self.frames: dict[int, FrameRoute] = {}
        self.auto: dict[tuple[int, int], torch.Tensor] = {}       # (frame, id) -> running map on its grid
        self._pending: dict[tuple[int, int], dict[tuple, list]] = {}  # (frame, id) -> grid -> [sum, count]
        self._sigma: float | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self.empty_warned: set[tuple[int, int]] = set()
        self.titles: dict[int, str] = {}  # frame -> how warnings name it ("frame 3" unless set, e.g. a photo)

    def add_frame(self, frame: int, characters, given: dict[str, torch.Tensor] | None = None,
                  sources: dict[str, str] | None = None, bounded: bool = False,
                  tokens: dict[str, torch.Tensor] | None = None) -> None:
        """A frame's characters (names), masks given for some (name -> [H, W] in 0..1) and what they came from,
        and each character's description tokens in the frame's conditioning (for automatic masks). A frame is
        bounded when asked, when it has several characters, or when a mask is given."""
        ids = tuple(self.ids[name] for name in characters)
        self.frames[frame] = FrameRoute(ids, {self.ids[n]: m for n, m in (given or {}).items()},
                                        {self.ids[n]: s for n, s in (sources or {}).items()},
                                        bounded or len(ids) > 1 or bool(given),
                                        {self.ids[n]: t for n, t in (tokens or {}).items()})

    def bounded(self) -> bool:
        return any(route.bounded for route in self.frames.values())

    def wants_maps(self, frame: int) -> list[int]:
        """The characters of a frame whose masks come from attention (no user mask or box), while maps still count."""
        route = self.frames.get(frame)
        if route is None or not route.bounded:
            return []
        if self.auto_until is not None and self._sigma is not None and self._sigma < self.auto_until:
            return []
        return [c for c in route.characters if c not in route.given]

    # ------------------------------------------------------------------ the step clock
    def at_sigma(self, sigma: float) -> None:
        """A new step: fold the maps gathered in the last one into the running masks."""
        if sigma == self._sigma:
            return
        self._sigma = sigma
        for key, sums in self._pending.items():
            grid = max(sums, key=lambda g: g[0] * g[1])
            count = sum(n for _, n in sums.values())
            step = sum(resize(total.cpu(), grid) for total, _ in sums.values()) / count  # the mean of the maps
            self.auto[key] = step if key not in self.auto else 0.5 * (resize(self.auto[key], grid) + step)
        if self._pending:
            self._cache.clear()
        self._pending = {}

    def add_map(self, frame: int, character: int, map_: torch.Tensor) -> None:
        """One call's map of a character (any grid, any device): scaled to 0..1 and summed per grid where it was
        made (no copy to the CPU, no device sync) until the step is folded."""
        map_ = map_.detach().float()
        low, high = map_.amin(), map_.amax()
        map_ = (map_ - low) / (high - low).clamp(min=1e-12)
        sums = self._pending.setdefault((frame, character), {})
        grid = tuple(map_.shape)
        if grid in sums:
            sums[grid][0].add_(map_)
            sums[grid][1] += 1
        else:
            sums[grid] = [map_, 1]

    def title(self, frame: int) -> str:
        return self.titles.get(frame, f"frame {frame + 1}")

    def no_mask(self, frame: int, character: int, why: str) -> None:
        """A character whose automatic mask is empty (or cannot be made): warn once, and it shares plainly: the
        frame's tokens no other character's mask claims are its own."""
        if (frame, character) in self.empty_warned:
            return
        self.empty_warned.add((frame, character))
        self._cache.clear()
        name = self.names[character - 1]
        log.warning("StoryKit identity routing: the automatic mask of %s in %s is empty (%s); %s shares plainly "
                    "there, on the tokens no other character's mask claims (give a Character Mask or a place like "
                    "[%s@left] to bound it)", name, self.title(frame), why, name, name)

    # ------------------------------------------------------------------ labels
    def mask_of(self, frame: int, character: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """A character's 0..1 mask in a frame on `grid`: given, or from attention (smoothed, Otsu-thresholded)."""
        route = self.frames[frame]
        if character in route.given:
            return resize(route.given[character], grid)
        soft = self._soft(frame, character, grid)
        if soft is None:
            return None
        mask = (soft > otsu_threshold(soft)).float()
        if not mask.any():  # a flat map: the description's tokens drew no attention anywhere
            self.no_mask(frame, character, "its description's tokens drew no attention anywhere")
            return None
        return mask

    def _soft(self, frame: int, character: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """A character's automatic map on `grid`, smoothed (ConsiStory's Gaussian) and scaled to 0..1."""
        key = ("soft", frame, character, grid)
        if key not in self._cache:
            auto = self.auto.get((frame, character))
            self._cache[key] = None if auto is None else normalise(smooth(resize(auto, grid), self.blur))
        return self._cache[key]

    def labels(self, frame: int, grid: tuple[int, int]) -> torch.Tensor:
        """Token labels of a frame on a grid: its one character everywhere when unbounded; else the masks."""
        key = (frame, grid)
        if key in self._cache:
            return self._cache[key]
        route = self.frames.get(frame)
        n = grid[0] * grid[1]
        if route is None or not route.characters:
            labels = torch.full((n,), BACKGROUND, dtype=torch.long)
        elif not route.bounded:
            labels = torch.full((n,), route.characters[0], dtype=torch.long)
        else:
            masks = {c: m for c in route.characters if (m := self.mask_of(frame, c, grid)) is not None}
            for c in masks:  # where automatic masks overlap, the stronger attention wins (never crosses 0.5)
                if c not in route.given:
                    masks[c] = masks[c] + 1e-3 * self._soft(frame, c, grid)
            plain = [c for c in route.characters if c not in masks and (frame, c) in self.empty_warned]
            pending = len(route.characters) - len(masks) - len(plain)
            rest = BACKGROUND if not pending and not plain else UNKNOWN
            labels = labels_from_masks(masks, grid, rest, self.threshold)
            if len(plain) == 1 and not pending:  # plain sharing for the one character without a mask
                labels = torch.where(labels == rest, plain[0], labels)
            elif len(plain) > 1 and (frame, BACKGROUND) not in self.empty_warned:
                self.empty_warned.add((frame, BACKGROUND))
                log.warning("StoryKit identity routing: %s: %s have no mask; they share nothing there (no "
                            "guess which tokens are whose)", self.title(frame),
                            " and ".join(self.names[c - 1] for c in plain))
        self._cache[key] = labels
        return labels

    def clear(self) -> None:
        self.frames.clear()
        self.auto.clear()
        self._pending.clear()
        self._cache.clear()
        self.empty_warned.clear()
        self._sigma = None


def colour_labels(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[h * w] labels -> an [h, w, 3] picture: one colour per character, black background, grey unknown."""
    palette = torch.tensor((UNKNOWN_COLOUR, BACKGROUND_COLOUR) + PALETTE, dtype=torch.float32)
    index = labels.clamp(min=-1) + 1
    index = torch.where(index > 1, (index - 2) % len(PALETTE) + 2, index)
    return palette[index].view(grid[0], grid[1], 3)
