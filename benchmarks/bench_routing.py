"""Identity routing side by side in one run: unmasked CSA against bounded CSA with two characters' masks, at SDXL's
64x64 decoder layer (layer A) and one FLUX block at 1024 px, through the real sites and CSA state the nodes
install; the identity leak (attention mass from A's queries to B's shared tokens) in both; what a photo reference
adds per step; what automatic masks (the text-to-image maps of each character's description) add per step.

    bash tools/storykit.sh python benchmarks/bench_routing.py [--quick] [--repeats 3] [--rate 0.5]

The batch: frame 0 shows A (left half) and B (right half) and reads; frames 1-3 are references of A, B, A (one
character each, so plain CSA's sharing there). Unmasked = today's CSA: frame 0 shares all of A's and B's tokens.
Bounded = Identity Routing with boxes: A's queries read only A's shared tokens, B's only B's.
Time: median of interleaved repeats. Memory: peak bytes of live tensors made by the call (benchmarks/measure.py).
"""
from __future__ import annotations

import argparse
import types

import torch
from bench_csa import Attn1  # benchmarks/ is on sys.path
from bench_csa_dit import FAMILIES, _grid, _host
from measure import interleaved_times, peak_bytes, say

PLAN = [(frozenset({"A", "B"}), False), (frozenset({"A"}), True), (frozenset({"B"}), True), (frozenset({"A"}), True)]


def _routing(ident, grid):
    routing = ident.Routing(["A", "B"])
    height, width = grid
    routing.add_frame(0, ["A", "B"], {"A": ident.box_mask(ident.BOXES["left"], height, width),
                                      "B": ident.box_mask(ident.BOXES["right"], height, width)}, {"A": "box",
                                                                                                 "B": "box"})
    for frame, (who, _) in enumerate(PLAN[1:], start=1):
        routing.add_frame(frame, sorted(who))
    return routing


def _state(csa_patch, rate, routing):
    state = csa_patch.ConsistentSelfAttention([rate], 1e9, 0.0, seed=0)
    state.plan = [csa_patch.StoryFrame(i, who, ref) for i, (who, ref) in enumerate(PLAN)]
    state.routing = routing
    return state


def _tokens(t, heads_first):
    """[L, C] token rows of one row's keys ([H, L, D] heads-first -> [L, H * D])."""
    return t.transpose(0, 1).reshape(t.shape[1], -1) if heads_first else t


def _rows_in(rows, targets):
    """Which rows of [L, C] equal some row of [n, C] (compared by a random projection: equal rows project alike)."""
    probe = torch.randn(rows.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch.isin(rows.double() @ probe, targets.double() @ probe)


def _leak(q0, keys, b_keys, heads_first):
    """Mean attention mass of the given queries on the key rows equal to one of b_keys (B's shared tokens)."""
    is_b = _rows_in(_tokens(keys, heads_first), _tokens(b_keys, heads_first))
    if not heads_first:
        q0, keys = q0[None], keys[None]
    d = q0.shape[-1]
    weights = torch.softmax(q0 @ keys.transpose(-1, -2) / d ** 0.5, dim=-1)
    return float(weights[..., is_b].sum(-1).mean())


def unet_case(n_tokens, channels, heads, rate, repeats, attention, csa, sites, csa_patch, ident):
    torch.manual_seed(0)
    attn = Attn1(channels, heads).eval()
    site = sites.UNetSelfAttention({("output", 0, 0): attn}, 3)
    grid = _grid(n_tokens)
    extra = {"block": ("output", 0), "block_index": 0, "n_heads": heads, "cond_or_uncond": [0],
             "sigmas": torch.full((4,), 5.0), "original_shape": [4, 4, *grid], "attn_precision": None}
    hidden = torch.randn(4, n_tokens, channels)
    with torch.no_grad():
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    plain, bounded = _state(csa_patch, rate, None), _state(csa_patch, rate, _routing(ident, grid))

    def call(state):
        site.technique = state
        return site.replace(q, k, v, extra)
    fns = {"unmasked": lambda: call(plain), "bounded": lambda: call(bounded)}
    with torch.no_grad():
        times = interleaved_times(fns, repeats)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    return times, peaks, _leaks(q, k, plain, bounded, grid, rate, call, csa, heads_first=False, heads=heads)


def dit_case(n_text, n_image, heads, dim, rate, repeats, attention, csa, sites, csa_patch, ident):
    torch.manual_seed(0)
    length = n_text + n_image
    q, k, v = (torch.randn(4, heads, length, dim) for _ in range(3))
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    grid = _grid(n_image)
    options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0], "sigmas": torch.full((4,), 0.5)}
    func = attention.optimized_attention
    plain, bounded = _state(csa_patch, rate, None), _state(csa_patch, rate, _routing(ident, grid))

    def call(state):
        return site.attention(state, (n_text, n_image, grid), None, func, q, k, v, heads, skip_reshape=True,
                              mask=None, transformer_options=options)
    fns = {"unmasked": lambda: call(plain), "bounded": lambda: call(bounded)}
    with torch.no_grad():
        times = interleaved_times(fns, repeats)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
    return times, peaks, _leaks(q, k, plain, bounded, grid, rate, call, csa, heads_first=True, start=n_text)


def _leaks(q, k, plain, bounded, grid, rate, call, csa, heads_first, heads=1, start=0):
    """Today's share of A's attention on B's shared tokens (the keys unmasked CSA gives frame 0), and the share
    in the calls bounded CSA makes for A's queries (spied at the kernel)."""
    n_image = grid[0] * grid[1]
    sigma = 5.0 if not heads_first else 0.5
    samples = {j: plain._sample(j, n_image, rate, sigma) + start for j in (1, 2, 3)}
    axis = 1 if heads_first else 0

    def take(t, idx):
        return t.index_select(axis, idx)
    own = k[0]
    keys = torch.cat([own] + [take(k[j], samples[j]) for j in (1, 2, 3)], dim=axis)
    b_keys = take(k[2], samples[2])
    left = (torch.arange(n_image) % grid[1] < grid[1] // 2).nonzero().flatten() + start
    q0 = take(q[0], left[:256])
    if not heads_first:  # one head's slice is enough to show the share
        d = q.shape[-1] // heads
        q0, keys, b_keys = q0[:, :d], keys[:, :d], b_keys[:, :d]
    today = _leak(q0, keys, b_keys, heads_first)
    seen = []
    real = csa.routed_attention

    def spy(*args, **kwargs):
        attention = args[3]

        def watching(qq, kk, vv):
            seen.append((qq[0], kk[0]))
            return attention(qq, kk, vv)
        return real(*args[:3], watching, *args[4:], **kwargs)
    csa.routed_attention = spy
    try:
        with torch.no_grad():
            call(bounded)
    finally:
        csa.routed_attention = real
    a_queries = take(q[0], left)
    routed = [(qq, kk) for qq, kk in seen if qq.shape == a_queries.shape and torch.equal(qq, a_queries)]
    b_full = _tokens(take(k[2], samples[2]), heads_first)
    hits = sum(int(_rows_in(_tokens(kk, heads_first), b_full).sum()) for _, kk in routed)
    return today, float(hits), len(routed)


def photo_cost(n_text, n_image, heads, dim, rate, repeats, attention, sites, csa_patch, ident):
    """A photo adds one row to its character's reference batch: that batch's joint-attention time with and without
    it at one FLUX block, and the bank bytes it writes per step (= one reference's)."""
    torch.manual_seed(0)
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    func = attention.optimized_attention
    grid = _grid(n_image)

    def batch(rows):
        q, k, v = (torch.randn(rows, heads, n_text + n_image, dim) for _ in range(3))
        state = csa_patch.ConsistentSelfAttention([rate], 1e9, 0.0, seed=0)
        state.plan = [csa_patch.StoryFrame(i, frozenset({"A"}), True) for i in range(rows)]
        options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0],
                   "sigmas": torch.full((rows,), 0.5)}
        return lambda: site.attention(state, (n_text, n_image, grid), None, func, q, k, v, heads,
                                      skip_reshape=True, mask=None, transformer_options=options)
    fns = {"2 references": batch(2), "2 references + photo": batch(3)}
    with torch.no_grad():
        times = interleaved_times(fns, repeats)
    return times


def _auto_routing(ident, n_text: int, frames: int = 4, description: int = 10):
    """Two characters in every frame, each with `description` text positions, no given masks: automatic."""
    routing = ident.Routing(["A", "B"])
    for f in range(frames):
        routing.add_frame(f, ["A", "B"], tokens={"A": torch.arange(3, 3 + description),
                                                 "B": torch.arange(20, 20 + description) % n_text})
    return routing


def _auto_state(csa_patch, routing, frames: int = 4):
    state = csa_patch.ConsistentSelfAttention([0.5], 1e9, 0.0, seed=0)
    state.plan = [csa_patch.StoryFrame(f, frozenset({"A", "B"}), False) for f in range(frames)]
    state.routing = routing
    return state


def _fold(routing, grid, calls: int, frames: int = 4):
    """One step's fold: `calls` maps per frame and character, then every frame's labels on the grid."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(grid, generator=g) for _ in range(4)]
    sigma = [10.0]

    def run():
        for f in range(frames):
            for c in (1, 2):
                for i in range(calls):
                    routing.add_map(f, c, maps[(f + c + i) % 4])
        sigma[0] -= 0.01
        routing.at_sigma(sigma[0])
        for f in range(frames):
            routing.labels(f, grid)
    return run


def auto_mask_cost(scale, repeats, attention, sites, csa_patch, ident):
    """Automatic masks' own cost against the (unmasked) CSA call they ride on; 4 frames, two characters of 10
    description tokens each, every frame bounded.

    SDXL layer A (4096 tokens x 640 channels, 10 heads, 77 text tokens of 2048 channels), 4 frames x 2 CFG halves:
    masks = the host's CrossAttention (attn2) with the site's attn2 patch and its q/k hooks (maps of the 4 cond
    rows handed to the Routing) minus the same attn2 alone. FLUX block (512 text + 4096 image tokens, 24 x 128),
    cond only: masks = ConsistentSelfAttention.observe on the call's q and k. fold = once per step: the Routing
    folding every call's maps of the step (36 calls: SDXL's up blocks; 48: FLUX's default blocks) and the 4 frames'
    labels (smoothing, Otsu). Per step = calls x masks + fold, against calls x the CSA call."""
    out = {}
    torch.manual_seed(0)
    tokens, channels, heads, n_text, width = 4096 // scale, 640, 10, 77, 2048
    grid = _grid(tokens)
    attn1 = Attn1(channels, heads).eval()
    attn2 = attention.CrossAttention(channels, width, heads, channels // heads, operations=torch.nn).eval()
    key = ("output", 0, 0)
    n, context = torch.randn(8, tokens, channels), torch.randn(8, n_text, width)
    extra = {"block": ("output", 0), "block_index": 0, "n_heads": heads, "cond_or_uncond": [1, 0],
             "sigmas": torch.full((8,), 5.0), "original_shape": [8, 4, *grid], "attn_precision": None}
    plain_site, maps_site = sites.UNetSelfAttention({key: attn1}, 3), sites.UNetSelfAttention({key: attn1}, 3)
    plain_site.technique = _auto_state(csa_patch, None)
    maps_site.technique = _auto_state(csa_patch, _auto_routing(ident, n_text))
    maps_site.cross = {key: attn2}

    def with_maps():  # the attn2 patch, then the block's own attn2 with the site's hooks (as in a model call)
        def run():
            x, ctx, _ = maps_site.observe(n, context, context, extra)
            return attn2(x, context=ctx)
        return maps_site.apply_model(run)
    fns = {"csa": lambda: plain_site.replace(attn1.to_q(n), attn1.to_k(n), attn1.to_v(n), extra),
           "attn2": lambda: attn2(n, context=context), "attn2 + masks": with_maps,
           "fold": _fold(_auto_routing(ident, n_text), grid, 36)}
    with torch.no_grad():
        t = interleaved_times(fns, repeats)
        peak = {name: peak_bytes(fns[name]) for name in ("csa", "attn2", "attn2 + masks")}
    out["SDXL 1024px up 64x64 (layer A)"] = (t["csa"], t["attn2 + masks"] - t["attn2"], t["fold"], 36, peak["csa"],
                                             max(0, peak["attn2 + masks"] - peak["attn2"]))

    torch.manual_seed(0)
    n_text, n_image, heads, dim = 512 // scale, 4096 // scale, 24, 128
    grid = _grid(n_image)
    q, k, v = (torch.randn(4, heads, n_text + n_image, dim) for _ in range(3))
    options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0], "sigmas": torch.full((4,), 0.5)}
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    plain, observing = _auto_state(csa_patch, None), _auto_state(csa_patch, _auto_routing(ident, n_text))
    call = sites.SiteCall(("double", 0), [(0, slice(0, 4))], slice(n_text, n_text + n_image), 0.5, heads=heads,
                          n_heads=heads, grid=grid, text=slice(0, n_text))
    fns = {"csa": lambda: site.attention(plain, (n_text, n_image, grid), None, attention.optimized_attention, q, k,
                                         v, heads, skip_reshape=True, mask=None, transformer_options=options),
           "masks": lambda: observing.observe(call, q.narrow(2, n_text, n_image), k.narrow(2, 0, n_text)),
           "fold": _fold(_auto_routing(ident, n_text), grid, 48)}
    with torch.no_grad():
        t = interleaved_times(fns, repeats)
        peak = {name: peak_bytes(fns[name]) for name in ("csa", "masks")}
    out["FLUX.1 block 1024px"] = (t["csa"], t["masks"], t["fold"], 48, peak["csa"], peak["masks"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.5)
    opts = parser.parse_args()
    attention, csa, sites, csa_patch = _host()
    from storykit.kernels import identity_routing as ident
    scale = 4 if opts.quick else 1
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, host attention "
        f"{attention.optimized_attention.__name__}, rate {opts.rate}, 4 frames (A+B reader, refs A, B, A), fp32")
    say("| shape | unmasked CSA | bounded CSA | time bounded/unmasked | peak MB unmasked | peak MB bounded | "
        "peak ratio | A->B mass unmasked | B keys in A's calls, bounded |")
    say("|---|---|---|---|---|---|---|---|---|")
    rows = [("SDXL 1024px up 64x64 (layer A)", lambda: unet_case(4096 // scale, 640, 10, opts.rate, opts.repeats,
                                                                  attention, csa, sites, csa_patch, ident)),
            ("FLUX.1 block 1024px", lambda: dit_case(512 // scale, 4096 // scale, 24, 128, opts.rate, opts.repeats,
                                                      attention, csa, sites, csa_patch, ident))]
    for name, run in rows:
        times, peaks, (today, routed, calls) = run()
        say(f"| {name}{' /4' if opts.quick else ''} | {times['unmasked']:.3f} s | {times['bounded']:.3f} s | "
            f"{times['bounded'] / times['unmasked']:.2f}x | {peaks['unmasked'] / 2 ** 20:.0f} | "
            f"{peaks['bounded'] / 2 ** 20:.0f} | {peaks['bounded'] / peaks['unmasked']:.2f}x | {today:.3f} | "
            f"{routed:.0f} (so mass 0; {calls} call{'s' if calls != 1 else ''} of A's queries) |")
    n_text, n_image = 512 // scale, 4096 // scale
    times = photo_cost(n_text, n_image, 24, 128, opts.rate, opts.repeats, attention, sites, csa_patch, ident)
    base, more = times["2 references"], times["2 references + photo"]
    kinds, width, halves, _ = FAMILIES["FLUX.1 dev"]
    model = types.SimpleNamespace(double_blocks=[None] * kinds["double"], single_blocks=[None] * kinds["single"])
    blocks = sites.JointAttention.default_blocks(sites.FAMILIES["Flux"], model)
    per_step = len(blocks) * csa.sample_count(4096, opts.rate) * 2 * width * 2 * halves  # fp16 keys + values
    say(f"\nPhoto reference at one FLUX block{' /4' if opts.quick else ''}: reference batch of 2 {base:.3f} s, with "
        f"a photo row {more:.3f} s ({more / base:.2f}x); bank per photo per step at 1024 px, FLUX.1 default blocks: "
        f"{per_step / 1e6:.0f} MB (as one reference frame)")

    say("\nAutomatic masks (text-to-image maps of two characters in each of 4 frames) against the unmasked CSA call:")
    say("| shape | CSA call | masks per call | masks / CSA call | fold per step | per step: masks / CSA | "
        "peak MB CSA / added by masks |")
    say("|---|---|---|---|---|---|---|")
    for name, (csa_time, masks, fold, calls, csa_peak, masks_peak) in auto_mask_cost(
            scale, opts.repeats, attention, sites, csa_patch, ident).items():
        say(f"| {name}{' /4' if opts.quick else ''} | {csa_time:.3f} s | {masks:.3f} s | {masks / csa_time:.3f}x | "
            f"{fold:.3f} s | {(calls * masks + fold) / (calls * csa_time):.3f}x | {csa_peak / 2 ** 20:.0f} / "
            f"{masks_peak / 2 ** 20:.0f} |")


if __name__ == "__main__":
    main()
