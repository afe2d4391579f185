"""Consistent Self-Attention cost, side by side in one run: plain self-attention, this pack's CSA (the real patch
object the node installs), the ideal cost, and the reference's published algorithm; then the bank's bytes and a
100-frame story against a 4-frame one.

    bash tools/storykit.sh python benchmarks/bench_csa.py [--quick] [--repeats 3] [--rate 0.5]

Per layer: 4 frames x 2 CFG halves of normed hidden states [8, N, C]; every method includes the q/k/v/out
projections. "ideal" = plain attention whose keys/values are (1 + r(B-1)) times longer (projections of the frame's
own tokens, attention over the longer keys/values: what CSA must at least cost). "reference" = the released
processor's algorithm as the spec describes it: a Bernoulli(rate) mask per frame and step, and for each frame the
other frames' masked hidden states concatenated and projected again, one frame at a time.
Time: time.perf_counter, 1 warm-up + repeats, median. Memory: peak bytes of live tensors created by the call,
counted by a TorchDispatchMode over every aten op's outputs (inputs and weights excluded; a fused kernel's
internal scratch is not visible). On CUDA it uses torch.cuda.max_memory_allocated instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from measure import PeakTensorBytes, interleaved_times, peak_bytes, say  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]


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
    from storykit.nodes import csa_patch
    return attention, csa, csa_patch


class _unet_csa:
    """The real UNet attn1 site with a CSA state, called as the host calls it: replace(q, k, v, extra) and the
    attn1 patch capture(n, context, value, extra); other attributes are the state's."""

    def __init__(self, csa_patch, layers, rate, **kw):
        from storykit.nodes import attention_sites
        self.site = attention_sites.UNetSelfAttention(layers)
        self.site.technique = csa_patch.ConsistentSelfAttention([rate], 1e9, 0.0, **kw)

    def __call__(self, q, k, v, extra):
        return self.site.replace(q, k, v, extra)

    def capture(self, n, context, value, extra):
        return self.site.capture(n, context, value, extra)

    def __getattr__(self, name):
        return getattr(self.site.technique, name)

    def __setattr__(self, name, value):
        if name == "site":
            object.__setattr__(self, name, value)
        else:
            setattr(self.site.technique, name, value)


def measure_all(fns: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Median wall time (methods taking turns) and peak bytes per method."""
    times = interleaved_times(fns, repeats)
    return {name: (times[name], peak_bytes(fn)) for name, fn in fns.items()}


class Attn1(torch.nn.Module):
    """The shape of the host's CrossAttention used as self-attention (to_q, to_k, to_v without bias, to_out)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(channels, channels, bias=False) for _ in range(3))
        self.to_out = torch.nn.Sequential(torch.nn.Linear(channels, channels))


def layer_case(name, n_tokens, channels, heads, frames, rate, repeats, attention, csa, csa_patch, latent_side):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = Attn1(channels, heads).to(device).eval()
    halves = 2
    n = torch.randn(frames * halves, n_tokens, channels, device=device)
    key = ("output", 0, 0)
    state = _unet_csa(csa_patch, {key: attn}, rate, seed=0, bank_dtype=torch.float16)
    side = int(n_tokens ** 0.5)
    extra = {"block": ("output", 0), "block_index": 0, "n_heads": heads, "cond_or_uncond": [1, 0],
             "sigmas": torch.full((frames * halves,), 5.0), "original_shape": [frames * halves, 4, latent_side,
                                                                              latent_side], "attn_precision": None}
    long = int(round(n_tokens * (1 + rate * (frames - 1))))
    k_long = torch.randn(frames * halves, long, channels, device=device)
    v_long = torch.randn_like(k_long)

    def attend(q, k, v):
        return attention.optimized_attention(q, k, v, heads)

    def plain():
        with torch.no_grad():
            return attn.to_out(attend(attn.to_q(n), attn.to_k(n), attn.to_v(n)))

    def ideal():
        with torch.no_grad():
            attn.to_k(n), attn.to_v(n)
            return attn.to_out(attend(attn.to_q(n), k_long, v_long))

    def ours():
        with torch.no_grad():
            return attn.to_out(state(attn.to_q(n), attn.to_k(n), attn.to_v(n), extra))

    gen = torch.Generator(device=device).manual_seed(1)

    def reference():
        with torch.no_grad():
            outs = []
            for h in range(halves):
                rows = n[h * frames:(h + 1) * frames]
                masks = torch.rand(frames, n_tokens, generator=gen, device=device) < rate  # Bernoulli per frame
                for i in range(frames):
                    ctx = torch.cat([rows[i]] + [rows[j][masks[j]] for j in range(frames) if j != i])[None]
                    q = attn.to_q(rows[i:i + 1])
                    outs.append(attn.to_out(attend(q, attn.to_k(ctx), attn.to_v(ctx))))
            return torch.cat(outs)

    # readers: the same 4 frames read a bank of 3 references (written by the capture hook), bank fp16 on the CPU,
    # projected per call; against a bank kept resident as projected fp32 keys/values (no cast, no projection)
    bank_state = _unet_csa(csa_patch, {key: attn}, rate, seed=0, bank_dtype=torch.float16)
    refs = torch.randn(3 * halves, n_tokens, channels, device=device)
    with torch.no_grad(), bank_state.story_run():
        bank_state.plan = [csa_patch.StoryFrame(100 + i, frozenset({"A"}), True) for i in range(3)]
        bank_state.capture(refs, refs, refs, {**extra, "sigmas": torch.full((6,), 5.0)})
        bank_state.plan = [csa_patch.StoryFrame(i, frozenset({"A"}), False) for i in range(frames)]
        held = [bank_state.bank.read(key, half, 5.0, [100, 101, 102], device) for half in (1, 0)]
        resident = torch.cat([t.float() for h in held for t in h.values()])[None]
        res_k, res_v = attn.to_k(resident)[0], attn.to_v(resident)[0]
        m = held[0][100].shape[0]
        spans = [[(h * 3 * m + r * m, m) for r in range(3)] for h in range(halves) for _ in range(frames)]

        def read_ours():
            return attn.to_out(bank_state(attn.to_q(n), attn.to_k(n), attn.to_v(n), extra))

        def read_resident():
            return attn.to_out(csa.consistent_self_attention(attn.to_q(n), attn.to_k(n), attn.to_v(n), attend,
                                                             [[]] * len(spans), {}, res_k, res_v, spans))
        results = measure_all({"plain": plain, "ideal": ideal, "ours": ours, "reference": reference,
                               "read_ours": read_ours, "read_resident": read_resident}, repeats)
    # rate 1.0: ours is the same maths as the reference on the same tokens
    state_full = _unet_csa(csa_patch, {key: attn}, 1.0, seed=0)
    with torch.no_grad():
        ours_full = state_full(attn.to_q(n), attn.to_k(n), attn.to_v(n), extra)
        rows = n[:frames]
        ctx = torch.cat([rows[0]] + [rows[j] for j in range(1, frames)])[None]
        ref_full = attend(attn.to_q(rows[:1]), attn.to_k(ctx), attn.to_v(ctx))
    diff = float((ours_full[:1] - ref_full).abs().max())
    return name, results, diff, side


def bank_bytes(rate: float, refs: int = 3, steps: int = 50, dtype=torch.float16):
    """SDXL at 1024 px: 36 decoder self-attention layers (30 at 32x32 x 1280, 6 at 64x64 x 640), both CFG halves."""
    layers = [(1024, 1280)] * 30 + [(4096, 640)] * 6
    from storykit.kernels import consistent_attention as csa
    per_ref_step = sum(csa.sample_count(n, rate) * c for n, c in layers) * 2 * torch.finfo(dtype).bits // 8
    largest_read = max(csa.sample_count(n, rate) * c for n, c in layers) * refs * 2 * torch.finfo(dtype).bits // 8
    return per_ref_step, per_ref_step * refs * steps, largest_read


def measured_bank(csa_patch, rate: float, refs: int = 3, steps: int = 2):
    """Fill the real bank for `steps` steps at SDXL 1024 px shapes (written from the capture hook) and count."""
    layers = {("output", i // 10, i % 10): None for i in range(30)}
    layers.update({("output", 3 + i // 2, i % 2): None for i in range(6)})
    state = _unet_csa(csa_patch, layers, rate, seed=0, bank_dtype=torch.float16)
    state.plan = [csa_patch.StoryFrame(i, frozenset({"A"}), True) for i in range(refs)]
    for step in range(steps):
        sigma = 10.0 - step
        for key in layers:
            tokens, channels = (1024, 1280) if key[1] < 3 else (4096, 640)
            n = torch.randn(refs * 2, tokens, channels, dtype=torch.float16)
            extra = {"block": key[:2], "block_index": key[2], "cond_or_uncond": [1, 0],
                     "sigmas": torch.full((refs * 2,), sigma), "original_shape": [refs * 2, 4, 128, 128]}
            state.capture(n, n, n, extra)
    return state.bank.nbytes(), state.bank.device_nbytes()


def story_peak(csa_patch, attention, frames_total: int, refs: int, batch: int, n_tokens: int, channels: int,
               heads: int, steps: int):
    """Peak live tensor bytes over a whole story at one layer: references write, readers read in batches."""
    torch.manual_seed(0)
    attn = Attn1(channels, heads).eval()
    key = ("output", 0, 0)
    state = _unet_csa(csa_patch, {key: attn}, 0.5, seed=0, bank_dtype=torch.float16)
    plan_refs = [csa_patch.StoryFrame(i, frozenset({"A"}), True) for i in range(refs)]
    readers = list(range(refs, frames_total))
    with PeakTensorBytes() as counter, torch.no_grad(), state.story_run():
        for rows in [list(range(refs))] + [readers[i:i + batch] for i in range(0, len(readers), batch)]:
            state.plan = plan_refs if rows[0] < refs else [csa_patch.StoryFrame(i, frozenset({"A"}), False)
                                                           for i in rows]
            for step in range(steps):
                n = torch.randn(len(rows) * 2, n_tokens, channels)
                extra = {"block": ("output", 0), "block_index": 0, "n_heads": heads, "cond_or_uncond": [1, 0],
                         "sigmas": torch.full((len(rows) * 2,), 10.0 - step),
                         "original_shape": [len(rows) * 2, 4, 64, 64], "attn_precision": None}
                state.capture(n, n, n, extra)
                attn.to_out(state(attn.to_q(n), attn.to_k(n), attn.to_v(n), extra))
                del n
        bank = state.bank.nbytes()
    return counter.peak, bank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--frames", type=int, default=4)
    opts = parser.parse_args()
    attention, csa, csa_patch = _host()
    scale = 4 if opts.quick else 1
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, host attention {attention.optimized_attention.__name__}, "
          f"{opts.frames} frames x 2 CFG halves, rate {opts.rate}, fp32")
    cases = [("SDXL 1024px up 32x32 (1024 tok x 1280 ch, 20 heads)", 1024 // scale, 1280, 20, 128),
             ("SDXL 1024px up 64x64 (4096 tok x 640 ch, 10 heads)", 4096 // scale, 640, 10, 128),
             ("SD1.5 512px up 16x16 (256 tok x 1280 ch, 8 heads)", 256 // scale, 1280, 8, 64),
             ("SD1.5 512px up 32x32 (1024 tok x 640 ch, 8 heads)", 1024 // scale, 640, 8, 64),
             ("SD1.5 512px up 64x64 (4096 tok x 320 ch, 8 heads)", 4096 // scale, 320, 8, 64)]
    say("\n| layer | plain | ideal | ours | reference | ours/ideal | ours/plain | reference/plain | "
          "ours/reference | peak MB plain / ideal / ours / reference |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for name, tokens, channels, heads, latent in cases:
        _, r, diff, _ = layer_case(name, tokens, channels, heads, opts.frames, opts.rate, opts.repeats, attention,
                                   csa, csa_patch, latent)
        t = {k: v[0] for k, v in r.items()}
        m = {k: v[1] / 2 ** 20 for k, v in r.items()}
        say(f"| {name} | {t['plain']:.3f} s | {t['ideal']:.3f} s | {t['ours']:.3f} s | {t['reference']:.3f} s | "
              f"{t['ours'] / t['ideal']:.2f}x | {t['ours'] / t['plain']:.2f}x | {t['reference'] / t['plain']:.2f}x | "
              f"{t['ours'] / t['reference']:.2f}x | {m['plain']:.0f} / {m['ideal']:.0f} / {m['ours']:.0f} / {m['reference']:.0f} |")
        say(f"|   rate 1.0: ours vs reference max abs difference {diff:.2e}; 4 readers of a 3-reference bank: "
              f"{t['read_ours']:.3f} s (bank fp16 hidden states on CPU, projected per call) vs {t['read_resident']:.3f} s (bank "
              f"kept as projected fp32 keys/values, twice the bytes) = {t['read_ours'] / t['read_resident']:.2f}x, "
              f"{t['read_ours'] / t['plain']:.2f}x plain |||||||||")

    per_ref_step, total, largest_read = bank_bytes(opts.rate)
    written, on_device = measured_bank(csa_patch, opts.rate)
    say(f"\nBank, SDXL 1024 px, 3 references x 50 steps, rate {opts.rate}, fp16, both CFG halves:")
    say(f"  per reference per step: {per_ref_step / 1e6:.1f} MB (spec: reference 110.1 MB)")
    say(f"  measured: real bank filled for 2 steps holds {written / 1e6:.1f} MB "
          f"(x25 = {written * 25 / 1e9:.2f} GB for 50 steps), {on_device} bytes of it on the accelerator")
    say(f"  total: {total / 1e9:.2f} GB, held in CPU memory; reference: {total / 1e9:.2f} GB on the GPU")
    say(f"  on the accelerator at any time: one layer's entry streamed in, at most {largest_read / 1e6:.1f} MB "
          f"(+ its keys/values) = {largest_read / total * 100:.3f}% of the reference's")

    args = dict(refs=3, batch=4, n_tokens=1024 // scale, channels=1280, heads=20, steps=2)
    say("\nStory at one SDXL 32x32 layer (3 references together, then readers 4 per batch, 2 steps, bank fp16 on "
          "CPU; peak live tensor bytes over the whole story):")
    peaks = {}
    for frames in (7, 20, 100):  # 7 = the references and one batch of 4 readers
        peaks[frames], bank = story_peak(csa_patch, attention, frames, **args)
        say(f"  {frames:3d} frames: peak {peaks[frames] / 2 ** 20:.1f} MB, bank {bank / 2 ** 20:.1f} MB")
    say(f"  100 frames / 7 frames: {peaks[100] / peaks[7]:.3f}")

if __name__ == "__main__":
    main()
