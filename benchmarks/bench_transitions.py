"""Per-frame semantic conditioning vs the host's native image conditioning on the same Wan 2.1 model and frames.

    bash tools/storykit.sh python benchmarks/bench_transitions.py [--dim 512 --layers 4 --frames 33 --size 256]

Same seeded random-weight WAN21 i2v model, noise, text and image tokens (257 ViT-H tokens of width 1280 per image):
`native` gives one image's tokens to every frame (WanImageToVideo + clip_vision_output), `semantic` patches the
model with a trajectory of one token set per latent frame (StoryKitWanSemanticMotion). Time: one child process runs
both variants interleaved after a warmup each (time.perf_counter wall and time.process_time CPU, medians), so load
from other jobs hits both alike. Memory: one fresh child per variant, torch.cuda.max_memory_allocated on CUDA, else
the child's peak RSS (ru_maxrss). Also times the Semantic
Motion Predictor (default 8 layers, hidden 1024, 16 heads) on one transition.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def build(args):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    from storykit.runner.testmodels import init_random
    unet = {"image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 36,
            "dim": args.dim, "ffn_dim": args.dim * 4, "freq_dim": 256, "text_dim": 4096, "out_dim": 16,
            "num_heads": args.dim // 64, "num_layers": args.layers, "eps": 1e-6, "dtype": torch.float32}
    cfg = comfy.supported_models.WAN21_I2V(unet)
    cfg.unet_config.update(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=comfy.model_management.unet_offload_device())
    init_random(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def setup(args):
    """(native MODEL, patched MODEL, sample function): same weights, noise, text and image tokens."""
    from storykit.runner import host
    host.boot()
    import comfy.clip_vision
    import comfy.sample
    import node_helpers
    import torch

    from storykit.nodes import nodes_transitions as nt
    torch.manual_seed(0)
    model = build(args)
    latent_frames = (args.frames - 1) // 4 + 1
    image_tokens = torch.randn(1, 257, 1280)
    cv_out = comfy.clip_vision.Output()
    cv_out["penultimate_hidden_states"] = image_tokens
    text = [[torch.randn(1, 512, 4096) * 0.1, {}]]
    values = {"clip_vision_output": cv_out,
              "concat_latent_image": torch.zeros(1, 16, latent_frames, args.size // 8, args.size // 8),
              "concat_mask": torch.zeros(1, 4, latent_frames, args.size // 8, args.size // 8)}
    pos = node_helpers.conditioning_set_values(text, values)
    neg = node_helpers.conditioning_set_values([[torch.zeros(1, 512, 4096), {}]], values)
    patched = nt.patch_wan(model, image_tokens[0] + 0.1 * torch.randn(latent_frames, 257, 1280))
    latent = torch.zeros(1, 16, latent_frames, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    cuda = torch.cuda.is_available()

    def run(m):
        with torch.inference_mode():
            out = comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "simple", pos, neg, latent,
                                      disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return out

    return model, patched, run, cuda


def child_memory(args):
    """One variant in a fresh process: peak memory of a warm run."""
    import torch
    native, patched, run, cuda = setup(args)
    model = patched if args.variant == "semantic" else native
    run(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run(model)
    memory = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    say(json.dumps({"memory": memory, "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS"}))


def child_time(args):
    """Both variants in one process, interleaved (ABBA...) so a load change on the machine hits both alike."""
    native, patched, run, _ = setup(args)
    models = {"native": native, "semantic": patched}
    for m in models.values():
        run(m)  # warmup
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for r in range(args.repeats):
        for name in (("native", "semantic") if r % 2 == 0 else ("semantic", "native")):
            w0, c0 = time.perf_counter(), time.process_time()
            run(models[name])
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    say(json.dumps({k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in models}))


def predictor_time(args):
    import torch

    from storykit.kernels import semantic_motion as smp
    net = smp.SemanticMotionPredictor(smp.PredictorConfig()).eval()
    net.reset_parameters(0)
    latent_frames = (args.frames - 1) // 4 + 1
    k_s, k_e = torch.randn(257, 1280), torch.randn(257, 1280)
    t = smp.LAYOUTS["wan21"].frame_times(args.frames)
    with torch.inference_mode():
        smp.predict_trajectory(net, k_s, k_e, t)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            smp.predict_trajectory(net, k_s, k_e, t)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    return statistics.median(times), params, latent_frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512, help="Wan hidden size (real 1.3B: 1536, 14B: 5120)")
    parser.add_argument("--layers", type=int, default=4, help="Wan blocks (real: 30 / 40)")
    parser.add_argument("--frames", type=int, default=33, help="video frames, 4k+1 (real: 81)")
    parser.add_argument("--size", type=int, default=256, help="square video size in pixels (real: 832x480)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["native", "semantic", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant == "time":
        return child_time(args)
    if args.variant:
        return child_memory(args)
    def child(variant):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("dim", "layers", "frames", "size", "steps", "repeats")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{variant} run failed")
        return json.loads(lines[-1])

    times = child("time")
    n, s = child("native"), child("semantic")
    tn, ts = times["native"], times["semantic"]
    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
    image = ((args.frames - 1) // 4 + 1) * 257
    say(f"Wan 2.1 i2v, random weights: dim {args.dim}, {args.layers} blocks, {args.frames} frames at "
        f"{args.size}x{args.size} ({tokens} video tokens, {image} image tokens), {args.steps} steps cfg 5; "
        f"medians of {args.repeats} interleaved runs")
    say(f"  native image conditioning : wall {tn['wall']:.2f} s  cpu {tn['cpu']:.2f} s  "
        f"{n['memory'] / 2**20:.0f} MiB ({n['memory_kind']})")
    say(f"  per-frame semantic tokens : wall {ts['wall']:.2f} s  cpu {ts['cpu']:.2f} s  {s['memory'] / 2**20:.0f} MiB")
    say(f"  ratio wall {ts['wall'] / tn['wall']:.3f}x  cpu {ts['cpu'] / tn['cpu']:.3f}x  "
        f"memory {s['memory'] / n['memory']:.3f}x   (goal <= 1.05x)")
    seconds, params, frames = predictor_time(args)
    say(f"Semantic Motion Predictor (8 layers, hidden 1024, 16 heads, {params / 1e6:.0f}M parameters): "
          f"{seconds * 1000:.0f} ms per transition ({frames} latent frames x 257 tokens)")


if __name__ == "__main__":
    main()
