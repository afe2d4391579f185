"""`python -m storykit`: run ComfyUI workflows headless through the real host executor, and make test models."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
from pathlib import Path

from . import convert as conv
from .host import PACK_DIR, HostNotFound

WORKFLOWS = PACK_DIR / "workflows"
DEMO_WORKFLOW = "storykit_csa_sd15"
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple", "CheckpointLoader|pysssss"}
TINY_KINDS = ("sd15", "sdxl", "flux", "flux2", "chroma", "qwen_image", "z_image", "sd3")
TINY_NODES = {"checkpoint": "StoryKitDevTinyCheckpoint", "model": "StoryKitDevTinyModel",
              "clip": "StoryKitDevTinyCLIP", "vae": "StoryKitDevTinyVAE"}
TINY_LOADER = TINY_NODES["checkpoint"]
# The stock loaders --tiny-model replaces, by what they hand out.
LOADER_ROLES = {**dict.fromkeys(CHECKPOINT_LOADERS, "checkpoint"), "UNETLoader": "model", "CLIPLoader": "clip",
                "DualCLIPLoader": "clip", "TripleCLIPLoader": "clip", "VAELoader": "vae"}
# The text-encoder loaders (node, `type` input) that fit each kind, as ComfyUI's own templates load them.
TINY_CLIP_LOADERS = {
    "sd15": {("CLIPLoader", "stable_diffusion")}, "sdxl": {("DualCLIPLoader", "sdxl")},
    "flux": {("DualCLIPLoader", "flux")}, "flux2": {("CLIPLoader", "flux2")}, "chroma": {("CLIPLoader", "chroma")},
    "qwen_image": {("CLIPLoader", "qwen_image")}, "z_image": {("CLIPLoader", "lumina2")},
    "sd3": {("TripleCLIPLoader", None), ("DualCLIPLoader", "sd3"), ("CLIPLoader", "sd3")},
}


def cache_dir() -> Path:
    return Path(os.environ.get("STORYKIT_CACHE") or Path.home() / ".cache" / "storykit")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storykit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, batch=False):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                       help="override an input; NODE is a node id or title, VALUE is JSON or text (repeatable)")
        p.add_argument("--models", help="a models folder laid out like ComfyUI/models (checkpoints/, loras/, ...)")
        p.add_argument("--output", default="storykit-batch" if batch else None,
                       help="the batch's folder (default ./storykit-batch)" if batch else
                       "where Save nodes write (default: the host's output folder)")
        p.add_argument("--input", default=None, help="where Load Image nodes read (default: the host's input folder)")
        p.add_argument("--ckpt", help="use this checkpoint file name (or path) in every Load Checkpoint node")
        p.add_argument("--tiny-model", choices=TINY_KINDS,
                       help="replace the model loaders (Load Checkpoint, UNET, CLIP and VAE loaders) by small "
                            "random-weight models of that family (seconds on a CPU)")
        p.add_argument("--quick", action="store_true",
                       help="smoke-run settings: latents and training pictures at most 256 px, every sampler, "
                            "scheduler and trainer at most 4 steps, DreamBooth at most 2 class pictures")
        if not batch:
            p.add_argument("--repeat", type=int, default=1,
                           help="queue the workflow N times, applying seed controls (increment/randomize) in between")
            p.add_argument("--save-api", help="also write the API-format prompt that was run to this file")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--verbose", action="store_true", help="show the host's log")

    run = sub.add_parser("run", help="execute a workflow (.json in UI or API format, or a ComfyUI .png)")
    run.add_argument("workflow")
    common(run)

    demo = sub.add_parser("demo", help="run a shipped example on a random-weight SD1.5 model (or --ckpt)")
    demo.add_argument("--workflow", default=DEMO_WORKFLOW,
                      choices=sorted(p.stem for p in WORKFLOWS.glob("*.json")),
                      help=f"which shipped workflow (default {DEMO_WORKFLOW}: a story with Consistent Self-Attention)")
    common(demo)

    batch = sub.add_parser("batch", help="run many stories through one workflow, here or on Ray; resumable",
                           description="Each story fills the workflow's Story Prompt or One-Prompt-One-Story "
                                       "encoder (text, seed, its own --set values) and lands in OUTPUT/<story id>/, "
                                       "with a line in OUTPUT/manifest.jsonl.")
    batch.add_argument("stories", help="a YAML/JSON list of {id, story, seed?, set?} (or identity_prompt and "
                                       "frame_prompts), or a folder of .txt stories")
    batch.add_argument("--workflow", required=True, help="the workflow to run per story (.json or .png)")
    common(batch, batch=True)
    batch.add_argument("--resume", action="store_true", help="run only the stories OUTPUT's manifest lacks as done")
    batch.add_argument("--retries", type=int, default=2, help="reruns of a story whose run fails (default 2)")
    batch.add_argument("--ray", action="store_true", help="run on a Ray cluster started here (one actor per GPU)")
    batch.add_argument("--address", help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:10001")
    batch.add_argument("--actors", type=int, help="Ray actors (default: one per GPU of the cluster, else 1)")

    convert = sub.add_parser("convert", help="turn a front-end workflow into the API format")
    convert.add_argument("workflow")
    convert.add_argument("-o", "--out", help="file to write (default: stdout)")
    convert.add_argument("--verbose", action="store_true")

    make = sub.add_parser("make-test-model", help="write the full-size random-weight SD1.5 checkpoint")
    make.add_argument("--models", default=None, help="models folder (default: the StoryKit cache)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--verbose", action="store_true")
    from . import eval as evaluation
    evaluation.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # The host logs what this runner reports again in plainer words; its log is there with --verbose.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # warnings still reach the runner's own checks (execute._IgnoredFiles), not the terminal
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.CRITICAL)
    logging.getLogger("storykit").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        if getattr(args, "handler", None):
            return args.handler(args)
        if args.command == "make-test-model":
            return _make_test_model(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "batch":
            return _batch(args)
        return _run(args, args.workflow)
    except (conv.WorkflowError, HostNotFound) as exc:
        sys.stderr.write(f"storykit: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("storykit: cancelled\n")
        return 130


def _boot(args):
    from . import host
    models = getattr(args, "models", None)
    h = host.boot(models_dir=models, output_dir=getattr(args, "output", None), input_dir=getattr(args, "input", None))
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)  # the host's tqdm bars: the runner draws its own progress line
    return h


def _make_test_model(args) -> int:
    from . import testmodels
    models = Path(args.models) if args.models else cache_dir() / "models"
    _boot(argparse.Namespace(models=str(models)))
    path = testmodels.write_random_sd15_checkpoint(models / "checkpoints", seed=args.seed)
    sys.stdout.write(f"{path}\n")
    return 0


def _convert(args) -> int:
    h = _boot(args)
    converted = conv.to_api(conv.load_workflow_file(args.workflow), conv.host_input_specs(h.nodes.NODE_CLASS_MAPPINGS))
    text = json.dumps(converted.prompt, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    return 0


def _demo(args) -> int:
    if not args.ckpt and not args.tiny_model:
        from . import testmodels
        models = Path(args.models) if args.models else cache_dir() / "models"
        args.models = str(models)
        _boot(args)
        sys.stderr.write("storykit: no --ckpt given: using a random-weight SD1.5 checkpoint (the pictures are noise)\n")
        testmodels.write_random_sd15_checkpoint(models / "checkpoints")
        args.ckpt = testmodels.RANDOM_SD15_NAME
        args.quick = True  # noise needs no 50 steps at 512 px: prove the path in minutes on a CPU
    if args.output is None:
        args.output = str(Path.cwd() / "output")
    return _run(args, str(WORKFLOWS / f"{args.workflow}.json"))


# Nodes that make latents (or videos) of a given size, and nodes whose `steps` are not sampling steps.
LATENT_SIZE_NODES = {"StoryKitStoryToVideo", "StoryKitSVDTransitionConditioning", "SVD_img2vid_Conditioning"}
NOT_SAMPLING_STEPS = {"SaveLoRA"}
TRAINERS = {"StoryKitTrainTextualInversion", "StoryKitTrainDreamBooth", "StoryKitTrainMotionPredictor",
            "TrainLoraNode"}


def quick_settings(prompt: dict, size: int = 256, steps: int = 4, class_images: int = 2) -> None:
    """Shrink a prompt for a smoke run: latents and training pictures to at most `size` px, every sampling and
    training step count to at most `steps` (KSamplerAdvanced start/end and SplitSigmas scaled with their steps),
    DreamBooth's class pictures to at most `class_images`."""
    scaled = {}  # node id -> (old steps, new steps), for the SplitSigmas fed by that scheduler

    def cap(inputs, key, limit):
        if isinstance(inputs.get(key), int) and not isinstance(inputs[key], bool) and inputs[key] > limit:
            inputs[key] = limit

    for node_id, entry in prompt.items():
        inputs, kind = entry["inputs"], entry["class_type"]
        if (kind.startswith("Empty") and "Latent" in kind) or kind in LATENT_SIZE_NODES:
            cap(inputs, "width", size)
            cap(inputs, "height", size)
        if kind in TRAINERS:
            cap(inputs, "resolution", size)
            cap(inputs, "num_class_images", class_images)
            cap(inputs, "class_sample_steps", steps)
        old = inputs.get("steps")
        if kind in NOT_SAMPLING_STEPS or not isinstance(old, int) or isinstance(old, bool) or old <= steps:
            continue
        inputs["steps"] = steps
        scaled[node_id] = (old, steps)
        for key in ("start_at_step", "end_at_step"):  # KSamplerAdvanced: same mapping, so chained stages still meet
            if isinstance(inputs.get(key), int) and inputs[key] < old:
                inputs[key] = round(inputs[key] * steps / old)
    for entry in prompt.values():
        link = entry["inputs"].get("sigmas")
        if entry["class_type"] == "SplitSigmas" and isinstance(link, list) and str(link[0]) in scaled:
            old, new = scaled[str(link[0])]
            if isinstance(entry["inputs"].get("step"), int):
                entry["inputs"]["step"] = round(entry["inputs"]["step"] * new / old)


def prepare_prompt(h, args, prompt: dict) -> dict:
    """--ckpt, --quick, --tiny-model and --set applied to an API prompt, in place (shared by run and batch)."""
    if args.ckpt:
        _use_checkpoint(h, prompt, args.ckpt)
    if getattr(args, "quick", False):
        quick_settings(prompt)
    if args.tiny_model:
        substitute_tiny_models(h.nodes, prompt, args.tiny_model)
    conv.apply_overrides(prompt, args.overrides)
    return prompt


def _run(args, workflow: str) -> int:
    from . import execute
    h = _boot(args)
    specs = conv.host_input_specs(h.nodes.NODE_CLASS_MAPPINGS)
    converted = conv.to_api(conv.load_workflow_file(workflow), specs)
    prompt = prepare_prompt(h, args, converted.prompt)
    if args.save_api:
        Path(args.save_api).write_text(json.dumps(prompt, indent=2) + "\n", encoding="utf-8")
    rng = random.Random()
    stop = _StopOnSignal()
    for index in range(max(1, args.repeat)):
        if index:
            conv.apply_controls(prompt, converted.controls, rng)
        try:
            with stop:
                result = execute.run_prompt(h, prompt, quiet=args.quiet)
        except execute.PromptFailed as exc:
            if stop.signum is None:
                sys.stderr.write(f"storykit: {exc}\n")
                return 1
            saved = getattr(exc, "saved", [])
            sys.stderr.write(f"storykit: stopped by {signal.Signals(stop.signum).name}"
                             + "".join(f"\n  {line}" for line in saved)
                             + ("" if saved else "; nothing was left to save") + "\n")
            return 128 + stop.signum
        for line in _saved_files(h, result.outputs):
            sys.stdout.write(line + "\n")
        if stop.signum is not None:  # the signal came after the last step: this run is whole, the next is not run
            sys.stderr.write(f"storykit: stopped by {signal.Signals(stop.signum).name} after run {index + 1}\n")
            return 128 + stop.signum
        if not args.quiet:
            sys.stderr.write(f"storykit: run {index + 1} finished in {result.seconds:.1f} s\n")
    return 0


class _StopOnSignal:
    """While open, the first Ctrl-C or SIGTERM does what the Cancel button does: the running node stops at the end
    of its step (trainers save it first). A second Ctrl-C quits at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        import comfy.model_management
        self.signum = signum
        comfy.model_management.interrupt_current_processing(True)
        sys.stderr.write("\nstorykit: stopping at the end of this step (Ctrl-C again quits now, without saving)\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _batch(args) -> int:
    from . import batch
    stories = batch.load_stories(args.stories)
    config = {"workflow": conv.load_workflow_file(args.workflow), "workflow_name": Path(args.workflow).name,
              "models": args.models and str(Path(args.models).resolve()), "ckpt": args.ckpt,
              "input": args.input and str(Path(args.input).resolve()), "tiny_model": args.tiny_model,
              "quick": args.quick, "overrides": args.overrides}
    records = batch.run_batch(stories, config, Path(args.output), resume=args.resume, retries=args.retries,
                              use_ray=args.ray, ray_address=args.address, actors=args.actors, quiet=args.quiet)
    failed = [r for r in records if r["status"] != "done"]
    for record in failed:
        sys.stderr.write(f"storykit: story {record['story_id']} failed: {record['error']}\n")
    sys.stdout.write(f"{Path(args.output) / batch.MANIFEST}\n")
    return 1 if failed else 0


def _use_checkpoint(h, prompt: dict, ckpt: str) -> None:
    path = Path(ckpt).expanduser()
    if path.is_file() and path.suffix.lower() not in h.folder_paths.supported_pt_extensions:
        raise conv.WorkflowError(f"--ckpt {ckpt}: not a model file (a checkpoint ends in "
                                 + ", ".join(sorted(h.folder_paths.supported_pt_extensions)) + ")")
    if path.is_file():
        h.folder_paths.add_model_folder_path("checkpoints", str(path.resolve().parent))
        ckpt = path.name
    elif ckpt not in h.folder_paths.get_filename_list("checkpoints"):
        raise conv.WorkflowError(f"--ckpt {ckpt}: no such file, and no checkpoint of that name in "
                                 + ", ".join(h.folder_paths.get_folder_paths("checkpoints")))
    loaders = [e for e in prompt.values() if e["class_type"] in CHECKPOINT_LOADERS]
    if not loaders:
        raise conv.WorkflowError("--ckpt: this workflow has no Load Checkpoint node to apply it to")
    for entry in loaders:
        entry["inputs"]["ckpt_name"] = ckpt


def _saved_files(h, outputs: dict) -> list[str]:
    lines = []
    for ui in outputs.values():
        for item in (ui or {}).get("images", []) if isinstance(ui, dict) else []:
            if isinstance(item, dict) and item.get("type") == "output":
                base = Path(h.folder_paths.get_output_directory())
                lines.append(str(base / item.get("subfolder", "") / item["filename"]))
    return lines


def register_tiny_loaders(nodes_module) -> None:
    """Development-only loader nodes that hand out the seeded tiny models (never part of the pack's node list): one
    with the outputs of Load Checkpoint (MODEL, CLIP, VAE) and one each for MODEL, CLIP and VAE."""
    if all(node_id in nodes_module.NODE_CLASS_MAPPINGS for node_id in TINY_NODES.values()):
        return
    from ..nodes.v3 import io

    from . import testmodels

    def make(role: str, outputs: list, pick):
        node_id = TINY_NODES[role]
        title = f"Tiny random {role} (StoryKit dev)"

        class TinyLoader(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                return io.Schema(
                    node_id=node_id, display_name=title, category="StoryKit/dev",
                    description=f"Development only (--tiny-model): the seeded random-weight {role} of a model "
                                "family, built from the host's own classes; pictures are noise.",
                    inputs=[io.Combo.Input("kind", options=list(TINY_KINDS), tooltip="model family"),
                            io.Int.Input("seed", default=0, tooltip="seed of the random weights")],
                    outputs=outputs)

            @classmethod
            def execute(cls, kind, seed=0):
                model, clip, vae = testmodels.tiny_models(kind, seed)
                return io.NodeOutput(*pick(model.clone(), clip.clone(), vae))

        TinyLoader.__name__ = TinyLoader.__qualname__ = f"Tiny{role.capitalize()}"
        TinyLoader.RELATIVE_PYTHON_MODULE = "storykit.runner"
        nodes_module.NODE_CLASS_MAPPINGS[node_id] = TinyLoader
        nodes_module.NODE_DISPLAY_NAME_MAPPINGS[node_id] = title

    make("checkpoint", [io.Model.Output(), io.Clip.Output(), io.Vae.Output()], lambda m, c, v: (m, c, v))
    make("model", [io.Model.Output()], lambda m, c, v: (m,))
    make("clip", [io.Clip.Output()], lambda m, c, v: (c,))
    make("vae", [io.Vae.Output()], lambda m, c, v: (v,))


def substitute_tiny_models(nodes_module, prompt: dict, kind: str, seed: int = 0) -> None:
    """Replace the stock loaders of an API prompt by dev nodes handing out the tiny `kind` models, in place.

    Load Checkpoint, UNETLoader, CLIPLoader/DualCLIPLoader/TripleCLIPLoader and VAELoader become dev nodes with the
    same outputs, so the rest of the graph is unchanged. A text-encoder loader whose `type` belongs to another family
    is an error (a FLUX graph cannot run on a tiny SDXL model), as is a graph with no loader at all.
    """
    if kind not in TINY_KINDS:
        raise conv.WorkflowError(f"--tiny-model {kind}: unknown kind; use one of {', '.join(TINY_KINDS)}")
    loaders = {nid: e for nid, e in prompt.items() if e.get("class_type") in LOADER_ROLES}
    if not loaders:
        raise conv.WorkflowError(f"--tiny-model {kind}: this workflow has no loader node to replace ("
                                 + ", ".join(sorted(LOADER_ROLES)) + ")")
    for nid, entry in loaders.items():
        fits = _clip_loader_fits(entry, kind)
        if fits is not True:
            raise conv.WorkflowError(f"--tiny-model {kind}: node {nid} ({entry['class_type']}) loads {fits}; "
                                     f"a {kind} model's text encoders come from "
                                     + " or ".join(f"{n}" + (f" type {t}" if t else "")
                                                   for n, t in sorted(TINY_CLIP_LOADERS[kind], key=str)))
    register_tiny_loaders(nodes_module)
    for entry in loaders.values():
        entry["class_type"] = TINY_NODES[LOADER_ROLES[entry["class_type"]]]
        entry["inputs"] = {"kind": kind, "seed": seed}


def _clip_loader_fits(entry: dict, kind: str):
    """True, or what the text-encoder loader loads instead (for the error message)."""
    if LOADER_ROLES[entry["class_type"]] != "clip":
        return True
    clip_type = None if entry["class_type"] == "TripleCLIPLoader" else entry["inputs"].get("type", "stable_diffusion")
    loader = (entry["class_type"], clip_type)
    if loader in TINY_CLIP_LOADERS[kind]:
        return True
    others = [k for k, fits in TINY_CLIP_LOADERS.items() if loader in fits]
    what = "the SD3 text encoders" if clip_type is None else f"text encoders of type {clip_type!r}"
    return what + (f" (use --tiny-model {others[0]})" if others else "")
