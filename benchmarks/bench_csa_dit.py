"""Consistent Self-Attention on DiT joint attention, side by side in one run: the host's plain joint attention, the
ideal cost, this pack's site override (the real JointAttention + CSA state the node installs), the same with a
memory budget of one frame per call, and the paper's algorithm transferred to joint attention (frame by frame);
then the bank's bytes per reference per step for each family at 1024 px.

    bash tools/storykit.sh python benchmarks/bench_csa_dit.py [--quick] [--repeats 1] [--rate 0.5]

One FLUX block at 1024 px: [B, 24 heads, 512 text + 4096 image tokens, 128], B frames, cond only (FLUX's distilled
guidance runs no uncond half). q, k, v arrive projected and rotated (the override's inputs); no projections.
"ideal" = the host's attention with every query over keys/values (1 + r(B-1)) image tokens longer.
"reference" = for each frame: its own [text ; image] keys plus Bernoulli(rate) image tokens of the other frames,
concatenated, one frame at a time (StoryDiffusion's processor on joint attention).
Time: median of interleaved repeats (time.perf_counter). Memory: peak bytes of live tensors created by the call
(benchmarks/measure.py; inputs excluded; a fused kernel's scratch is not visible).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from measure import interleaved_times, peak_bytes, say  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]

# real configs (1024 px: 4096 image tokens for each): blocks per kind, width, CFG halves in the template
FAMILIES = {
    "FLUX.1 dev": ({"double": 19, "single": 38}, 3072, 1, "Flux"),
    "FLUX.2 dev": ({"double": 8, "single": 48}, 6144, 1, "Flux"),
    "Chroma": ({"double": 19, "single": 38}, 3072, 2, "Flux"),
    "Qwen-Image": ({"double": 60}, 3072, 2, "QwenImage"),
    "SD3.5 large": ({"joint": 38}, 2432, 2, "SD3"),
    "Z-Image turbo": ({"joint": 30}, 3840, 1, "Lumina2"),
}


def _host():
    sys.path.insert(0, str(REPO.parent))
    from storykit.runner import host
    root = host.comfyui_path()
    sys.path.insert(0, str(root))
    import utils.extra_config  # noqa: F401 - as the host's main.py does
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import comfy.ldm.modules.attention as attention
    from storykit.kernels import consistent_attention as csa
    from storykit.nodes import attention_sites, csa_patch
    return attention, csa, attention_sites, csa_patch


def _grid(n_image: int) -> tuple[int, int]:
    side = int(round(n_image ** 0.5))
    return side, n_image // side


def block_case(frames, n_text, n_image, heads, dim, rate, repeats, attention, csa, sites, csa_patch):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    length = n_text + n_image
    q, k, v = (torch.randn(frames, heads, length, dim, device=device) for _ in range(3))
    options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0],
               "sigmas": torch.full((frames,), 0.5)}
    layout = (n_text, n_image, _grid(n_image))
    func = attention.optimized_attention
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    state = csa_patch.ConsistentSelfAttention([rate], 1e9, 0.0, seed=0)
    one_row = 2 * (length + (frames - 1) * csa.sample_count(n_image, rate)) * heads * dim * q.element_size()
    bounded = csa_patch.ConsistentSelfAttention([rate], 1e9, 0.0, seed=0, attention_budget=one_row)
    extra = int(round(n_image * rate * (frames - 1)))
    k_long = torch.randn(frames, heads, length + extra, dim, device=device)
    v_long = torch.randn_like(k_long)
    gen = torch.Generator(device=device).manual_seed(1)

    def call(technique):
        return site.attention(technique, layout, None, func, q, k, v, heads, skip_reshape=True, mask=None,
                              transformer_options=options)

    def reference():
        masks = torch.rand(frames, n_image, generator=gen, device=device) < rate
        outs = []
        for i in range(frames):
            shared_k = [k[j, :, n_text:][:, masks[j]] for j in range(frames) if j != i]
            shared_v = [v[j, :, n_text:][:, masks[j]] for j in range(frames) if j != i]
            kk = torch.cat([k[i]] + shared_k, dim=1)[None]
            vv = torch.cat([v[i]] + shared_v, dim=1)[None]
            outs.append(func(q[i:i + 1], kk, vv, heads, skip_reshape=True))
        return torch.cat(outs)

    fns = {"plain": lambda: func(q, k, v, heads, skip_reshape=True),
           "ideal": lambda: func(q, k_long, v_long, heads, skip_reshape=True),
           "ours": lambda: call(state), "ours_bounded": lambda: call(bounded), "reference": reference}
    with torch.no_grad():
        times = interleaved_times(fns, repeats)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        full = csa_patch.ConsistentSelfAttention([1.0], 1e9, 0.0, seed=0)
        ours_full = call(full)
        kk = torch.cat([k[0]] + [k[j, :, n_text:] for j in range(1, frames)], dim=1)[None]
        vv = torch.cat([v[0]] + [v[j, :, n_text:] for j in range(1, frames)], dim=1)[None]
        ref_full = func(q[:1, :, n_text:], kk, vv, heads, skip_reshape=True)
    diff = float((ours_full[:1, n_text:] - ref_full).abs().max())
    return times, peaks, diff


def story_peak(attention, sites, csa_patch, frames_total: int, refs: int, batch: int, n_text: int, n_image: int,
               heads: int, dim: int, steps: int) -> tuple[int, int]:
    """Peak live tensor bytes over a whole story at one FLUX block: 3 references write the bank, readers read it
    4 at a time, through the real override; the bank fp16 on the CPU."""
    from measure import PeakTensorBytes
    torch.manual_seed(0)
    func = attention.optimized_attention
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    state = csa_patch.ConsistentSelfAttention([0.5], 1e9, 0.0, seed=0, bank_dtype=torch.float16)
    plan_refs = [csa_patch.StoryFrame(i, frozenset({"A"}), True) for i in range(refs)]
    readers = list(range(refs, frames_total))
    length = n_text + n_image
    with PeakTensorBytes() as counter, torch.no_grad(), state.story_run():
        for rows in [list(range(refs))] + [readers[i:i + batch] for i in range(0, len(readers), batch)]:
            state.plan = plan_refs if rows[0] < refs else [csa_patch.StoryFrame(i, frozenset({"A"}), False)
                                                           for i in rows]
            for step in range(steps):
                q, k, v = (torch.randn(len(rows), heads, length, dim) for _ in range(3))
                options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0],
                           "sigmas": torch.full((len(rows),), 1.0 - 0.1 * step)}
                site.attention(state, (n_text, n_image, _grid(n_image)), None, func, q, k, v, heads, skip_reshape=True, mask=None,
                               transformer_options=options)
                del q, k, v
        bank = state.bank.nbytes()
    return counter.peak, bank


def bank_table(csa, sites, rate: float, steps: int = 28):
    say(f"\nBank per reference per step at 1024 px (4096 image tokens), rate {rate}, fp16 keys+values, default "
        f"blocks (the later half; single-stream blocks all), CFG halves of the template:")
    say("| family | blocks kept | MB per reference per step | GB per reference over 28 steps |")
    say("|---|---|---|---|")
    for name, (kinds, width, halves, key) in FAMILIES.items():
        family = sites.FAMILIES[key]
        model = types.SimpleNamespace(**{family.blocks[kind]: [None] * n for kind, n in kinds.items()})
        blocks = sites.JointAttention.default_blocks(family, model)
        per_step = len(blocks) * csa.sample_count(4096, rate) * width * 2 * 2 * halves
        say(f"| {name} | {sites.format_blocks(blocks)} | {per_step / 1e6:.0f} | {per_step * steps / 1e9:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens (smoke run)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--frames", type=int, default=4)
    opts = parser.parse_args()
    attention, csa, sites, csa_patch = _host()
    scale = 4 if opts.quick else 1
    n_text, n_image, heads, dim = 512 // scale, 4096 // scale, 24, 128
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, host attention {attention.optimized_attention.__name__}, "
        f"FLUX block {n_text} text + {n_image} image tokens, {heads} heads x {dim}, {opts.frames} frames, "
        f"rate {opts.rate}, fp32")
    times, peaks, diff = block_case(opts.frames, n_text, n_image, heads, dim, opts.rate, opts.repeats, attention,
                                    csa, sites, csa_patch)
    mb = {k: v / 2 ** 20 for k, v in peaks.items()}
    say("| method | time | vs plain | vs ideal | peak MB | peak vs reference |")
    say("|---|---|---|---|---|---|")
    for name in ("plain", "ideal", "ours", "ours_bounded", "reference"):
        say(f"| {name} | {times[name]:.3f} s | {times[name] / times['plain']:.2f}x | "
            f"{times[name] / times['ideal']:.2f}x | {mb[name]:.0f} | {mb[name] / mb['reference']:.2f}x |")
    say(f"rate 1.0: image tokens of frame 0, ours vs attention over [own text ; own image ; all others' image] "
        f"from scratch: max abs difference {diff:.2e}")
    bank_table(csa, sites, opts.rate)
    say(f"\nStory at one FLUX block ({n_text // 2} text + {n_image // 4} image tokens, 3 references together, then "
        "readers 4 per batch, 2 steps, bank fp16 on the CPU; peak live tensor bytes over the whole story):")
    peaks = {}
    for frames in (7, 20, 100):
        peaks[frames], bank = story_peak(attention, sites, csa_patch, frames, 3, 4, n_text // 2, n_image // 4,
                                         heads, dim, 2)
        say(f"  {frames:3d} frames: peak {peaks[frames] / 2 ** 20:.1f} MB, bank {bank / 2 ** 20:.1f} MB")
    say(f"  100 frames / 7 frames: {peaks[100] / peaks[7]:.3f}")


if __name__ == "__main__":
    main()
