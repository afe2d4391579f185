"""One-Prompt-One-Story cost, side by side in one run (CPU unless CUDA is there):

1. one cross-attention layer (to_q/k/v, attention, to_out) at SD1.5 and SDXL shapes: plain vs IPCA bias vs IPCA
   concatenated keys/values; time (median of repeats after warmup) and memory (CUDA: max_memory_allocated;
   CPU: peak live bytes of the tensors the layer creates, tracked op by op with a TorchDispatchMode);
2. SVR time per frame (SD1.5: 768 channels; SDXL: 768 + 1280, each part on its own);
3. IPCA on one FLUX.1 joint-attention block at 1024 px (512 T5 + 4096 image tokens, 24 heads x 128; a quarter
   of the tokens with --quick), through the real site override (attention_sites.JointAttention + ipca_patch's
   technique): plain joint attention vs the site with no technique work (its split into text and image queries) vs
   IPCA bias vs IPCA exact (P0 alone as extra text rows), time and peak;
4. a whole 5-frame story on the tiny SD1.5 model: this pack's flow (frames in one batch, IPCA bias) vs plain sampling
   of the same frames vs the reference code's flow (one extra generation of the identity prompt to store its
   keys/values, then each frame alone with concatenated keys/values); denoiser calls counted with an APPLY_MODEL
   wrapper, time measured around comfy.sample.sample.

    bash tools/storykit.sh python benchmarks/bench_1p1s.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch
from measure import interleaved_times, peak_bytes, say  # benchmarks/ is on sys.path


def compare(fns: dict, warmup=2, repeats=7) -> dict:
    """Median seconds per variant, taking turns; on CPU this process's CPU time (other programs on a shared machine
    do not count), on CUDA wall-clock time around synchronised calls."""
    return interleaved_times(fns, repeats, warmup, cpu_time=True)


# ---------------------------------------------------------------------------------------------- 1. attention
def cross_attention_layer(mod, host_attention, shape, frames, device, repeats):
    name, tokens, channels, heads, context_dim = shape
    torch.manual_seed(0)
    attn = host_attention.CrossAttention(channels, context_dim, heads=heads, dim_head=channels // heads,
                                         dtype=torch.float32, device=device)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2 * frames, tokens, channels, device=device)
    ctx = torch.randn(2 * frames, 77, context_dim, device=device)
    identity = mod.StoryIdentity(12, 77, torch.randn(1, 12, context_dim, device=device), frames)
    opts = {"cond_or_uncond": [1, 0], "n_heads": heads, "dim_head": channels // heads, "attn_precision": None}
    bias = mod.IPCAState(identity, exact=False, dropout=0.0, seed=0)
    concat = mod.IPCAState(identity, exact=True, dropout=0.0, seed=0)

    def plain():
        with torch.no_grad():
            return attn(x, context=ctx, transformer_options=opts)

    def patched(state):
        def run():
            with torch.no_grad():
                n, c, v = x, ctx, ctx
                if state.exact:
                    n, c, v = state.extend_context(n, c, v, opts)
                return attn.to_out(state(attn.to_q(n), attn.to_k(c), attn.to_v(v), opts))
        return run

    fns = {"plain": plain, "IPCA bias": patched(bias), "IPCA concatenated": patched(concat)}
    times = compare(fns, repeats=repeats)
    rows = {label: (times[label], peak_bytes(fn)) for label, fn in fns.items()}
    base_t, base_m = rows["plain"]
    say(f"\n[{name}] one cross-attention layer, {2 * frames} rows (cond+uncond), {tokens} queries, "
          f"{channels} channels, {heads} heads, context 77 x {context_dim}")
    for label, (t, m) in rows.items():
        say(f"  {label:18s} {t * 1e3:8.2f} ms  x{t / base_t:5.3f}   peak {m / 2**20:8.2f} MiB  x{m / base_m:5.3f}")
    return rows


# ---------------------------------------------------------------------------------------------- 2. SVR
def svr_per_frame(ops, frames=5, repeats=5):
    say("\n[SVR] time per frame (kernel, float64 SVDs; 5 frames, 6-token frames, 10-token identity)")
    lens = [6] * frames
    plan = ops.consolidate(10, lens, 10)
    for label, parts in (("SD1.5 768", [768]), ("SDXL 768+1280", [768, 1280])):
        embeds = torch.randn(77, sum(parts))

        def run(parts=parts, embeds=embeds):
            for fp in plan:
                sets = ops.token_sets(10, lens, fp)
                ops.reweight_parts(embeds, parts, lambda e, sets=sets: ops.svr(e, sets))
        t = compare({"svr": run}, warmup=1, repeats=repeats)["svr"] / frames
        say(f"  {label:14s} {t * 1e3:7.2f} ms per frame")


# ---------------------------------------------------------------------------------------------- 3. DiT block
def joint_attention_case(mod, host_attention, quick, frames=2, identity_rows=20, repeats=5):
    import types
    package = mod.__package__
    sites = sys.modules.get(package + ".attention_sites") or __import__(package + ".attention_sites", fromlist=["x"])
    ipca = __import__(package + ".ipca_patch", fromlist=["x"])
    scale = 4 if quick else 1
    n_text, n_image, heads, dim = 512 // scale, 4096 // scale, 24, 128
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    func = host_attention.optimized_attention
    options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [0], "sigmas": torch.full((frames,), .5)}
    site = sites.JointAttention(sites.FAMILIES["Flux"], types.SimpleNamespace(patch_size=2), {("double", 0)})
    identity = mod.StoryIdentity(identity_rows, 0, torch.zeros(1, identity_rows, 8), frames, ("l", "t5xxl"),
                                 tuple(range(identity_rows)), False)
    bias = ipca.JointIPCA(identity, exact=False, text_offset=0)
    exact = ipca.JointIPCA(identity, exact=True, text_offset=0)
    exact.context_len = n_text                      # as its APPLY_MODEL wrapper sets it per model call
    q, k, v = (torch.randn(frames, heads, n_text + n_image, dim, device=device) for _ in range(3))
    qe, ke, ve = (torch.randn(frames, heads, n_text + identity_rows + n_image, dim, device=device) for _ in range(3))

    def call(technique, layout, q, k, v):
        return site.attention(technique, layout, None, func, q, k, v, heads, skip_reshape=True, mask=None,
                              transformer_options=options)
    class PassThrough:     # the site's own cost: the same split of text / image queries, no IPCA
        def active(self, call):
            return True

        def attend(self, call, q, k, v, attend):
            return attend(q, k, v)
    fns = {"plain joint attention": lambda: func(q, k, v, heads, skip_reshape=True),
           "site pass-through": lambda: call(PassThrough(), (n_text, n_image, None), q, k, v),
           "IPCA bias": lambda: call(bias, (n_text, n_image, None), q, k, v),
           "IPCA exact (T5)": lambda: call(exact, (n_text + identity_rows, n_image, None), qe, ke, ve)}
    with torch.no_grad():
        times = compare(fns, warmup=1, repeats=repeats)
        peaks = {label: peak_bytes(fn) for label, fn in fns.items()}
    base_t, base_m = times["plain joint attention"], peaks["plain joint attention"]
    say(f"\n[FLUX.1 block] joint attention, {frames} frames (cond only, cfg 1), {n_text} text + {n_image} image "
        f"tokens, {heads} heads x {dim}, {identity_rows} identity rows, fp32, host attention {func.__name__}")
    say("| method | time | vs plain | peak MB | vs plain |")
    say("|---|---|---|---|---|")
    for label in fns:
        say(f"| {label} | {times[label] * 1e3:.1f} ms | {times[label] / base_t:.3f}x | {peaks[label] / 2**20:.0f} | "
            f"{peaks[label] / base_m:.2f}x |")


def t5_bias_gap(mod, kinds=("flux", "chroma", "sd3"), sigmas=(0.9, 0.6, 0.3)):
    """IPCA bias vs exact on T5 (bidirectional), tiny random-weight models: one denoiser call per sigma on 2 story
    frames (cond rows), || bias - exact || / || exact - plain || of the model output (plain = no IPCA)."""
    import comfy.model_management  # noqa: F401 - the host is booted
    from storykit.runner import testmodels
    encode = mod.OnePromptStoryEncode
    ipca = mod.IdentityPreservingCrossAttention
    say("\n[IPCA on T5] bias (approximation) vs exact path, tiny models, 2 frames, model output at sigma "
        + ", ".join(map(str, sigmas)))
    say("| model | IPCA effect (exact vs plain, relative) | bias vs exact, relative to the effect |")
    say("|---|---|---|")
    for kind in kinds:
        model, clip, _ = testmodels.tiny_models(kind, 0)
        out = encode.execute(clip, "a watercolor fox wearing a red scarf", "reads a book\nruns in the snow", 10,
                             "SVR", 0.01, 1.0, 0.01, 0.05).result
        context, identity = out[0][0][0], out[1]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, model.model.latent_format.latent_channels, 8, 8, generator=g)
        conds = model.model.extra_conds(cross_attn=context, pooled_output=out[0][0][1].get("pooled_output"),
                                        guidance=3.5, noise=x, device=x.device, width=64, height=64)
        extra = {k: v.process_cond(batch_size=2, device=x.device).cond for k, v in conds.items()}
        ctx = extra.pop("c_crossattn")
        models = {"plain": model, "bias": ipca.execute(model, identity, "bias (fast)", 0.0, 0).result[0],
                  "exact": ipca.execute(model, identity, "concatenated (exact)", 0.0, 0).result[0]}
        effect, gap = [], []
        for sigma in sigmas:
            res = {}
            for name, m in models.items():
                options = dict(m.model_options.get("transformer_options", {}))
                options.update({"wrappers": m.wrappers, "cond_or_uncond": [0], "sigmas": torch.full((2,), sigma)})
                with torch.no_grad():
                    res[name] = m.model.apply_model(x, torch.full((2,), sigma), c_crossattn=ctx,
                                                    transformer_options=options, **extra)
            effect.append(float((res["exact"] - res["plain"]).norm() / res["plain"].norm()))
            gap.append(float((res["bias"] - res["exact"]).norm() / (res["exact"] - res["plain"]).norm()))
        say(f"| tiny {kind} | {min(effect):.2e} - {max(effect):.2e} | {min(gap):.2f} - {max(gap):.2f} |")


# ---------------------------------------------------------------------------------------------- 4. story
def story_cost(h, mod, frames, steps, size, repeats):
    import comfy.patcher_extension
    import comfy.sample
    from storykit.runner import testmodels

    model, clip, _ = testmodels.tiny_models("sd15", 0)
    encode = h.nodes.NODE_CLASS_MAPPINGS["StoryKitOnePromptStoryEncode"]
    ipca = h.nodes.NODE_CLASS_MAPPINGS["StoryKitIdentityPreservingCrossAttention"]
    lines = ["reading a book under a tree", "running through a snowy forest", "sailing a paper boat",
             "sleeping by a campfire", "climbing a mountain", "painting at an easel"][:frames]
    out = encode.execute(clip, "a watercolor fox wearing a red scarf", "\n".join(lines), 10, "SVR",
                         0.01, 1.0, 0.01, 0.05)
    positive, identity = out.result[0], out.result[1]
    ctx, pooled = positive[0][0], positive[0][1]["pooled_output"]
    negative = [[torch.zeros_like(ctx[:1]), {"pooled_output": torch.zeros_like(pooled[:1])}]]
    latent = torch.zeros(frames, 4, size // 8, size // 8)

    def counted(m):
        m = m.clone()
        calls = {"calls": 0, "images": 0}

        def apply_model(executor, *args, **kwargs):
            calls["calls"] += 1
            calls["images"] += args[0].shape[0] // 2       # cond + uncond rows of one image count once
            return executor(*args, **kwargs)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench", apply_model)
        return m, calls

    def sample(m, pos, lat):
        noise = comfy.sample.prepare_noise(lat[:1], 0).repeat(lat.shape[0], 1, 1, 1)
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", pos, negative, lat, seed=0,
                                   disable_pbar=True)

    ours_m, ours_calls = counted(ipca.execute(model, identity, "bias (fast)", 0.0, 0).result[0])
    plain_m, plain_calls = counted(model)
    store_m, store_calls = counted(model)
    exact_m, frame_calls = counted(ipca.execute(model, identity, "concatenated (exact)", 0.0, 0).result[0])
    alone = clip.encode_from_tokens(clip.tokenize("a watercolor fox wearing a red scarf"), return_pooled=True)

    def reference():   # identity generation (stores K/V), then each frame alone with K/V concatenated
        sample(store_m, [[alone[0], {"pooled_output": alone[1]}]], latent[:1])
        for j in range(frames):
            sample(exact_m, [[ctx[j:j + 1], {"pooled_output": pooled[j:j + 1]}]], latent[:1])

    fns = {"plain batch": lambda: sample(plain_m, positive, latent),
           "1P1S (this pack)": lambda: sample(ours_m, positive, latent),
           "reference flow": reference}
    counters = {"plain batch": [plain_calls], "1P1S (this pack)": [ours_calls],
                "reference flow": [store_calls, frame_calls]}
    runs = 1 + repeats    # one warmup, then the timed repeats
    times = compare(fns, warmup=1, repeats=repeats)
    results = {label: (times[label], sum(c["calls"] for c in counters[label]) // runs,
                       sum(c["images"] for c in counters[label]) // runs) for label in fns}
    t_ref, c_ref, i_ref = results["reference flow"]
    say(f"\n[story] tiny SD1.5 (model_channels 32), {frames} frames, {size}x{size}, {steps} euler steps, cfg 5")
    t_ours, c_ours, i_ours = results["1P1S (this pack)"]
    for label, (t, c, i) in results.items():
        say(f"  {label:18s} {t:7.3f} s   denoiser calls {c:4d}   image evaluations {i:4d}")
    say(f"  1P1S / plain time x{t_ours / results['plain batch'][0]:.3f} (goal <= 1.1); "
          f"1P1S / reference: time x{t_ours / t_ref:.3f}, image evaluations {i_ours}/{i_ref} = {i_ours / i_ref:.3f} "
          f"(goal <= N/(N+1) = {frames / (frames + 1):.3f}), batched calls {c_ours}/{c_ref}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--attention", default="host", choices=["host", "pytorch"],
                        help="host: the host's own choice on this machine; pytorch: force SDPA (what GPUs run)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: steadiest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from storykit.runner import host as host_mod
    h = host_mod.boot(cpu=not torch.cuda.is_available())
    import comfy.model_management
    from comfy.ldm.modules import attention as host_attention
    mod = sys.modules[h.nodes.NODE_CLASS_MAPPINGS["StoryKitOnePromptStoryEncode"].__module__]
    ops = sys.modules[mod.__package__.rsplit(".", 1)[0] + ".kernels.one_prompt_story"]
    if args.attention == "pytorch":
        host_attention.optimized_attention = host_attention.attention_pytorch
        host_attention.optimized_attention_masked = host_attention.attention_pytorch
    device = comfy.model_management.get_torch_device()
    say(f"torch {torch.__version__}, device {device}, attention {host_attention.optimized_attention.__name__}, "
          f"threads {torch.get_num_threads()}")
    tokens = 1024 if args.quick else 4096
    shapes = [("SD1.5 512px, 64x64 level", tokens, 320, 8, 768),
              ("SDXL 1024px, 64x64 level", tokens, 640, 10, 2048)]
    for shape in shapes:
        cross_attention_layer(mod, host_attention, shape, frames=1, device=device, repeats=5 if args.quick else 15)
    svr_per_frame(ops)
    joint_attention_case(mod, host_attention, args.quick, repeats=3 if args.quick else 5)
    t5_bias_gap(mod)
    story_cost(h, mod, frames=5, steps=4 if args.quick else 10, size=64 if args.quick else 128,
               repeats=3 if args.quick else 5)


if __name__ == "__main__":
    main()
