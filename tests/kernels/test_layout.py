"""Comic layout kernel: page plans, panel rectangles, and the pixels that land in each panel."""
import pytest
import torch

from storykit.kernels import layout as lay


@pytest.mark.parametrize("layout,n,per_page,expected", [
    ("classic", 5, 0, [[2, 1, 2]]),
    ("classic", 7, 0, [[2, 1, 2], [2]]),
    ("four-panel", 6, 0, [[2, 2], [2]]),
    ("grid", 5, 0, [[3, 2]]),
    ("strip", 6, 3, [[3], [3]]),
    ("webtoon", 3, 0, [[1, 1, 1]]),
])
def test_row_counts(layout, n, per_page, expected):
    assert lay.row_counts(n, layout, per_page) == expected


def test_every_frame_gets_one_panel_inside_the_page():
    pages = lay.row_counts(7, "classic")
    height, layouts = lay.page_geometry(pages, 64, 96, 800, 20, 10, 30, "classic")
    frames = [p.frame for panels in layouts for p in panels]
    assert frames == list(range(7))
    for panels in layouts:
        for p in panels:
            assert p.x >= 20 and p.x + p.w <= 800 - 20 + 1
            assert p.y >= 20 and p.caption_y + 30 <= height
    # panels of a row never overlap
    first = layouts[0]
    assert first[0].x + first[0].w < first[1].x


def test_compose_puts_each_frame_in_its_panel():
    frames = torch.stack([torch.full((32, 32, 3), v) for v in (0.1, 0.5, 0.9)])
    height, layouts = lay.page_geometry([[3]], 32, 32, 3 * 40 + 20, 10, 0, 0, "strip")
    pages = lay.compose_pages(frames, height, 140, layouts, (1.0, 1.0, 1.0), 0, (0.0, 0.0, 0.0))
    assert pages.shape == (1, height, 140, 3)
    for p, value in zip(layouts[0], (0.1, 0.5, 0.9), strict=True):
        assert torch.allclose(pages[0, p.y:p.y + p.h, p.x:p.x + p.w], torch.tensor(value), atol=1e-5)
    assert torch.all(pages[0, :10] == 1.0)  # margin keeps the background


def test_cover_resize_crops_the_centre():
    img = torch.zeros(10, 30, 3)
    img[:, 10:20] = 1.0  # a bright centre third
    out = lay.cover_resize(img, 10, 10)
    assert out.shape == (10, 10, 3)
    assert out.mean() > 0.95


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown layout"):
        lay.row_counts(3, "manga")
    with pytest.raises(ValueError, match="at least one frame"):
        lay.row_counts(0, "grid")
