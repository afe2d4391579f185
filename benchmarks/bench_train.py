"""Seconds per step and peak memory of StoryKit's trainers beside the host's own TrainLoraNode, in one run.

    bash tools/storykit.sh python benchmarks/bench_train.py [--res 128] [--steps 8] [--models sd15,sdxl]

Each configuration runs in its own child process (so peak memory is that configuration's alone) on the seeded tiny
SD1.5-shaped and SDXL-shaped models (runner/testmodels.py), with the models built and trained under
torch.inference_mode() as the executor runs nodes. Same data (3 synthetic pictures), batch 1, rank 8, AdamW. Every configuration runs `--rounds` times, interleaved with
the others, and the fastest round is reported.

- Time: the host's ProgressBar hook stamps every finished step (both trainers report through it); per step is the
  median interval after `--warmup` steps, in wall-clock seconds and in CPU seconds of the process (all threads:
  time.process_time), the latter being what to compare on a machine shared with other jobs.
- Memory: on CUDA torch.cuda.max_memory_allocated. On CPU (no allocator statistics; process RSS is dominated by
  the host's own start-up peak) by counting tensor bytes: the peak of the bytes autograd holds for backward
  (torch.autograd.graph.saved_tensors_hooks: added when packed, released when unpacked in backward; unique
  storages; the models' own Parameters excluded, so weights a trainer materialises per step do count), plus the trainable state (parameters, gradients and two
  AdamW moments: 16 bytes per fp32 parameter).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [
    # name, trainer, options
    ("StoryKit DreamBooth-LoRA", "db", {}),
    ("StoryKit DreamBooth-LoRA +grad ckpt", "db", {"gradient_checkpointing": True}),
    ("StoryKit DreamBooth-LoRA bf16", "db", {"precision": "bf16"}),
    ("StoryKit DreamBooth-LoRA +prior", "db", {"prior": True}),
    ("StoryKit Textual Inversion", "ti", {}),
    ("StoryKit Textual Inversion +grad ckpt", "ti", {"gradient_checkpointing": True}),
    ("host TrainLoraNode fp32", "host", {"training_dtype": "fp32"}),
    ("host TrainLoraNode fp32 +grad ckpt", "host", {"training_dtype": "fp32", "gradient_checkpointing": True}),
    ("host TrainLoraNode bf16", "host", {"training_dtype": "bf16"}),
    ("host TrainLoraNode, one LATENT input", "host", {"training_dtype": "fp32", "single_latent": True}),
]


def child(spec: dict) -> dict:
    from storykit.runner import host as host_mod
    base = Path(tempfile.mkdtemp(prefix="storykit-bench-"))
    for sub in ("models/checkpoints", "models/loras", "models/embeddings", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    h = host_mod.boot(models_dir=base / "models", output_dir=base / "output", input_dir=base / "input", cpu=True)
    import comfy.model_management as mm
    import comfy.utils
    import torch

    from storykit.runner import testmodels
    mod = sys.modules[h.nodes.NODE_CLASS_MAPPINGS["StoryKitTrainDreamBooth"].__module__]
    tr = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".training"]
    res, steps, kind, opts = spec["res"], spec["steps"], spec["model"], spec["opts"]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, res, res, 3, generator=gen)
    cuda = torch.cuda.is_available()

    stamps: list[tuple[float, float]] = []
    live: dict[int, list[int]] = {}  # storage -> [pack count, bytes]
    held, peak_saved = [0], [0]

    def on_step(value, total, preview, node_id=None):
        stamps.append((time.perf_counter(), time.process_time()))
        live.clear()
        held[0] = 0

    def pack(t):
        base = t if t._base is None else t._base
        if isinstance(base, torch.nn.Parameter):
            return (t, None)
        key = t.untyped_storage().data_ptr()
        entry = live.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            held[0] += entry[1]
            peak_saved[0] = max(peak_saved[0], held[0])
        entry[0] += 1
        return (t, key)

    def unpack(packed):
        t, key = packed
        entry = live.get(key)
        if entry is not None and entry[0] > 0:
            entry[0] -= 1
            if entry[0] == 0:
                held[0] -= entry[1]
        return t

    comfy.utils.set_progress_bar_global_hook(on_step)
    with torch.inference_mode(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        model, clip, vae = testmodels.build_unet(kind, 0), testmodels.build_clip(kind, 1), testmodels.build_vae(2)
        unet_mb = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters()) / 2 ** 20
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mm.load_models_gpu([model])
        result = {"unet_mb": unet_mb}
        try:
            if spec["trainer"] == "db":
                prior = opts.get("prior", False)
                _, _, _, hist = mod.train_dreambooth(
                    model, clip, vae, images, identifier="sks", class_noun="person", prior_preservation=prior,
                    prior_weight=1.0, class_latents=torch.randn(2, 4, res // 8, res // 8) if prior else None,
                    mode="LoRA", rank=8, alpha=8.0, train_text_encoder=False, learning_rate=5e-4,
                    text_encoder_lr=5e-5, steps=steps, batch_size=1, resolution=res,
                    gradient_checkpointing=opts.get("gradient_checkpointing", False), seed=0,
                    precision=opts.get("precision", "fp32"), name="bench")
                loras = mod._attach_lora(model.model.diffusion_model, "", mod.LORA_TARGETS, 8, 8.0, gen)
                result["trainable_params"] = sum(p.numel() for m in loras.values() for p in m.parameters())
            elif spec["trainer"] == "ti":
                mod.train_textual_inversion(
                    model, clip, vae, images, token="bench", initializer_word="person", vectors=1, steps=steps,
                    learning_rate=5e-3, batch_size=1, resolution=res, templates=mod.OBJECT_TEMPLATES, seed=0,
                    gradient_checkpointing=opts.get("gradient_checkpointing", False), precision="fp32")
                result["trainable_params"] = 768 + (1280 if kind == "sdxl" else 0)
            else:
                result.update(_host_train(h, model, clip, vae, images, res, steps, opts, tr))
        except Exception as exc:  # the comparison reports how a trainer fails instead of stopping
            result["error"] = f"{type(exc).__name__}: {exc}"
    state = 16 * result.get("trainable_params", 0)
    result["peak_mb"] = (torch.cuda.max_memory_allocated() if cuda else peak_saved[0] + state) / 2 ** 20
    for i, key in enumerate(("sec_per_step", "cpu_per_step")):
        intervals = [b[i] - a[i] for a, b in zip(stamps, stamps[1:], strict=False)][spec["warmup"]:]
        if intervals and "error" not in result:
            result[key] = sorted(intervals)[len(intervals) // 2]
    return result


def _host_train(h, model, clip, vae, images, res, steps, opts, tr):
    import torch
    node = h.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
    latents = vae.encode(tr.fit_images(images, res).movedim(1, -1))
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a sks person"), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    if opts.get("single_latent"):
        latent_in = [{"samples": latents}]  # one LATENT with the whole batch, the ordinary way to wire it
    else:
        latent_in = [{"samples": latents[i:i + 1]} for i in range(latents.shape[0])]  # avoids its crash
    out = node.execute(model=[model], latents=latent_in, positive=[positive], batch_size=[1],
                       grad_accumulation_steps=[1], steps=[steps], learning_rate=[5e-4], rank=[8],
                       optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[opts["training_dtype"]],
                       lora_dtype=["fp32"], algorithm=["LoRA"],
                       gradient_checkpointing=[opts.get("gradient_checkpointing", False)], existing_lora=["[None]"])
    lora = out.args[1] if hasattr(out, "args") else out[1]
    return {"trainable_params": sum(t.numel() for t in lora.values() if torch.is_tensor(t))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=128, help="training resolution in pixels (latents are res/8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="run every configuration this many times, interleaved; the fastest round counts "
                             "(a shared machine only ever slows a run down)")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--only", default="", help="comma-separated substrings of configuration names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write("RESULT " + json.dumps(child(json.loads(args.child))) + "\n")
        return
    import torch
    device = "cuda" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    sys.stdout.write(f"# bench_train: {device}, torch {torch.__version__}, res {args.res}px, batch 1, "
                     f"{args.steps} steps ({args.warmup} warm-up), rank 8, best of {args.rounds} interleaved rounds\n")
    rows = []
    for kind in args.models.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, trainer, opts in CONFIGS:
                if args.only and not any(s in name for s in args.only.split(",")):
                    continue
                if "error" in best.get(name, {}):
                    continue
                spec = {"model": kind, "trainer": trainer, "opts": opts, "res": args.res, "steps": args.steps,
                        "warmup": args.warmup}
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env=os.environ)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                result = json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                old = best.get(name)
                if old is None or result.get("cpu_per_step", 1e9) < old.get("cpu_per_step", 1e9):
                    best[name] = result
        for name, result in best.items():
            rows.append((kind, name, result))
            _print_row(kind, name, result)
    _print_ratios(rows)


def _print_row(kind: str, name: str, r: dict) -> None:
    if "error" in r:
        sys.stdout.write(f"{kind:5} {name:42} FAILED {r['error'][:150]}\n")
    else:
        sys.stdout.write(f"{kind:5} {name:42} {r.get('cpu_per_step', float('nan')):7.3f} CPU s/step "
                         f"({r.get('sec_per_step', float('nan')):6.3f} wall)  "
                         f"training memory {r['peak_mb']:7.1f} MiB  trainable {r.get('trainable_params', 0) / 1e6:6.3f} M  "
                         f"(UNet {r['unet_mb']:.1f} MiB)\n")
    sys.stdout.flush()


def _print_ratios(rows) -> None:
    table = {(k, n): r for k, n, r in rows}
    pairs = [("StoryKit DreamBooth-LoRA", "host TrainLoraNode fp32"),
             ("StoryKit DreamBooth-LoRA +grad ckpt", "host TrainLoraNode fp32 +grad ckpt"),
             ("StoryKit DreamBooth-LoRA bf16", "host TrainLoraNode bf16")]
    for kind in sorted({k for k, _, _ in rows}):
        for ours, theirs in pairs:
            a, b = table.get((kind, ours)), table.get((kind, theirs))
            if not a or not b or "error" in a or "error" in b or "cpu_per_step" not in a or "cpu_per_step" not in b:
                continue
            sys.stdout.write(f"{kind:5} {ours} vs {theirs}: CPU time x{a['cpu_per_step'] / b['cpu_per_step']:.2f}, "
                             f"training memory x{a['peak_mb'] / max(b['peak_mb'], 1e-6):.2f}\n")


if __name__ == "__main__":
    main()
