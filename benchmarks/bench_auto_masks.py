"""What identity routing's automatic character masks cost, against the Consistent Self-Attention call they ride on.

    bash tools/storykit.sh python benchmarks/bench_auto_masks.py [--quick] [--repeats 3]

Two shapes, 4 frames, each frame with two characters of 10 description tokens, every frame bounded:
- SDXL 1024 px layer A (up blocks at 32x32: 1024 tokens x 1280 channels, 20 heads; 77 text tokens of 2048
  channels), 4 frames x 2 CFG halves: "CSA call" = the real UNet site's attn1 replace with unbounded CSA (rate 0.5,
  q/k/v projections included); "maps" = the host's CrossAttention (attn2) with the site's attn2 patch and its q/k
  hooks (the maps of both characters in the 4 cond rows handed to the Routing) minus the same attn2 alone.
- FLUX.1 1024 px, one double block: [4, 24 heads, 512 text + 4096 image tokens, 128], cond only: "CSA call" = the
  real joint-attention override with unbounded CSA; "maps" = ConsistentSelfAttention.observe on the same q and k.
"fold" = what a step adds once: Routing.at_sigma folding every call's maps of the last step (36 calls: SDXL's up
blocks; 48: FLUX's default blocks) and the labels of the 4 frames on the step's grids (smoothing, Otsu).
Per step = calls x maps + fold, against calls x the CSA call. --quick: a quarter of the image tokens.
Time: median of interleaved repeats (time.perf_counter). Memory: peak bytes of live tensors made by the call
(benchmarks/measure.py).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from measure import interleaved_times, peak_bytes, say  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
FRAMES, DESCRIPTION = 4, 10


def _host():
    sys.path.insert(0, str(REPO.parent))
    from storykit.runner import host
    root = host.comfyui_path()
    sys.path.insert(0, str(root))
    import utils.extra_config  # noqa: F401 - as the host's main.py does
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import comfy.ldm.modules.attention as attention
    from storykit.kernels import identity_routing as ident
    from storykit.nodes import attention_sites, csa_patch
    return attention, ident, attention_sites, csa_patch


def _routing(ident, n_text: int):
    """Two characters in every frame, each with DESCRIPTION text positions, no given masks: automatic."""
    routing = ident.Routing(["Lena", "Bob"])
    for f in range(FRAMES):
        routing.add_frame(f, ["Lena", "Bob"], tokens={"Lena": torch.arange(3, 3 + DESCRIPTION),
                                                      "Bob": torch.arange(20, 20 + DESCRIPTION) % n_text})
    return routing


def _technique(csa_patch, routing=None):
    state = csa_patch.ConsistentSelfAttention([0.5], 1e9, 0.0, seed=0)
    state.plan = [csa_patch.StoryFrame(f, frozenset({"Lena", "Bob"}), False) for f in range(FRAMES)]
    state.routing = routing
    return state


def _fold(routing, ident, grid, calls: int):
    """One step's fold: `calls` maps per frame and character, then every frame's labels on the grid."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(grid, generator=g) for _ in range(4)]
    sigma = [10.0]

    def run():
        for f in range(FRAMES):
            for c in (1, 2):
                for i in range(calls):
                    routing.add_map(f, c, maps[(f + c + i) % 4])
        sigma[0] -= 0.01
        routing.at_sigma(sigma[0])
        for f in range(FRAMES):
            routing.labels(f, grid)
    return run


def sdxl_case(attention, ident, sites, csa_patch, scale: int, repeats: int):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, channels, heads, n_text, width = 1024 // scale, 1280, 20, 77, 2048
    side = int(tokens ** 0.5)
    attn1 = types.SimpleNamespace(**{name: torch.nn.Linear(channels, channels, bias=False).to(device)
                                     for name in ("to_q", "to_k", "to_v")})
    attn2 = attention.CrossAttention(channels, width, heads, channels // heads, device=device,
                                     operations=torch.nn).to(device).eval()
    key = ("output", 0, 0)
    rows = FRAMES * 2
    n = torch.randn(rows, tokens, channels, device=device)
    context = torch.randn(rows, n_text, width, device=device)
    extra = {"block": ("output", 0), "block_index": 0, "n_heads": heads, "cond_or_uncond": [1, 0],
             "sigmas": torch.full((rows,), 5.0), "original_shape": [rows, 4, side * 4, side * 4],
             "attn_precision": None}
    plain_site, maps_site = sites.UNetSelfAttention({key: attn1}), sites.UNetSelfAttention({key: attn1})
    plain_site.technique = _technique(csa_patch)
    maps_site.technique = _technique(csa_patch, _routing(ident, n_text))
    maps_site.cross = {key: attn2}

    def csa_call():
        return plain_site.replace(attn1.to_q(n), attn1.to_k(n), attn1.to_v(n), extra)

    def cross_plain():
        return attn2(n, context=context)

    def cross_maps():  # the attn2 patch, then the block's own attn2 with the site's hooks (as in a model call)
        def run():
            x, ctx, _ = maps_site.observe(n, context, context, extra)
            return attn2(x, context=ctx)
        return maps_site.apply_model(run)

    return _measure({"csa": csa_call, "cross": cross_plain, "cross_maps": cross_maps},
                    _fold(_routing(ident, n_text), ident, (side, side), 36), 36, repeats)


def flux_case(attention, ident, sites, csa_patch, scale: int, repeats: int):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_text, n_image, heads, dim = 512, 4096 // scale, 24, 128
    side = int(n_image ** 0.5)
    q, k, v = (torch.randn(FRAMES, heads, n_text + n_image, dim, device=device) for _ in range(3))
    options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0],
               "sigmas": torch.full((FRAMES,), 0.5)}
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    routing = _routing(ident, n_text)
    plain, observing = _technique(csa_patch), _technique(csa_patch, routing)
    call = sites.SiteCall(("double", 0), [(0, slice(0, FRAMES))], slice(n_text, n_text + n_image), 0.5,
                          heads=heads, n_heads=heads, grid=(side, side), text=slice(0, n_text))

    def csa_call():
        return site.attention(plain, (n_text, n_image, (side, side)), None, attention.optimized_attention, q, k, v,
                              heads, skip_reshape=True, mask=None, transformer_options=options)

    def maps():
        observing.observe(call, q.narrow(2, n_text, n_image), k.narrow(2, 0, n_text))

    return _measure({"csa": csa_call, "maps": maps}, _fold(_routing(ident, n_text), ident, (side, side), 48), 48,
                    repeats)


def _measure(fns: dict, fold, calls: int, repeats: int):
    """Times and peaks; "maps" is the masks' own cost per call (UNet: attn2 with the hooks minus attn2 alone)."""
    with torch.no_grad():
        times = interleaved_times({**fns, "fold": fold}, repeats)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    if "cross" in fns:
        times["maps"] = times["cross_maps"] - times["cross"]
        peaks["maps"] = max(0, peaks["cross_maps"] - peaks["cross"])
    per_step = (calls * times["maps"] + times["fold"]) / (calls * times["csa"])
    return times, peaks, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the image tokens (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    attention, ident, sites, csa_patch = _host()
    scale = 4 if opts.quick else 1
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, host attention {attention.optimized_attention.__name__}, "
        f"{FRAMES} frames x 2 characters, fp32{', quarter size' if opts.quick else ''}")
    say("\n| shape | CSA call | masks (per call) | masks / CSA call | fold (per step) | per step: masks / CSA | "
        "peak MB CSA / added by masks |")
    say("|---|---|---|---|---|---|---|")
    for name, case in (("SDXL 1024 px layer A (32x32, 1280 ch, 20 heads, 77 text)", sdxl_case),
                       ("FLUX.1 1024 px double block (512 text + 4096 image, 24 x 128)", flux_case)):
        t, m, per_step = case(attention, ident, sites, csa_patch, scale, opts.repeats)
        say(f"| {name} | {t['csa'] * 1e3:.1f} ms | {t['maps'] * 1e3:.1f} ms | {t['maps'] / t['csa']:.3f}x | "
            f"{t['fold'] * 1e3:.1f} ms | {per_step:.3f}x | {m['csa'] / 2 ** 20:.0f} / {m['maps'] / 2 ** 20:.0f} |")


if __name__ == "__main__":
    main()
