"""The comic layout node inside the host: pages, captions drawn where they belong, clear errors."""
import pytest
import torch


def test_pages_and_captions(node_class):
    node = node_class("StoryKitComicLayout")
    frames = torch.rand(5, 64, 64, 3)
    args = dict(layout="classic", panels_per_page=0, page_width=512, margin=16, gutter=8, border=2,
                font_size=16, background="#ffffff", ink="black")
    plain = node.execute(frames=frames, caption_mode="none", **args).result[0]
    captioned = node.execute(frames=frames, captions="one\ntwo\n\nfour\nfive", caption_mode="below", **args).result[0]
    assert plain.shape[0] == 1 and plain.shape[2] == 512
    assert captioned.shape[1] > plain.shape[1]  # room for the caption bands
    # ink appears in the caption band under frame 1, and not under frame 3 (its caption line is empty)
    from storykit.kernels import layout as lay
    band = captioned.shape[1] - plain.shape[1]
    pages = lay.row_counts(5, "classic")
    _, layouts = lay.page_geometry(pages, 64, 64, 512, 16, 8, band // len(pages[0]), "classic")
    panels = layouts[0]

    def band_of(p):
        return captioned[0, p.caption_y + 2:p.caption_y + band // len(pages[0]) - 2, p.x + 4:p.x + p.w - 4]

    assert (band_of(panels[0]) < 0.5).any()
    assert not (band_of(panels[2]) < 0.5).any()


def test_bad_colour_names_the_input(node_class):
    node = node_class("StoryKitComicLayout")
    with pytest.raises(ValueError, match="background"):
        node.execute(frames=torch.rand(2, 32, 32, 3), layout="grid", panels_per_page=0, page_width=512, margin=0,
                     gutter=0, border=0, caption_mode="none", font_size=12, background="#zzz", ink="black")
