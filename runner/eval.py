"""`python -m storykit eval FOLDER|MANIFEST`: score stories' consistency and write JSON, CSV, a table and an HTML report.

Stories come from a batch manifest (JSON lines: story_id, files, prompts, status, ...), a folder of story
subfolders, or a folder of frames straight from the runner (frames saved by one run, i.e. with the same workflow in
their PNG metadata, are one story). Prompts come from the manifest or from the PNG metadata ComfyUI writes.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("storykit.eval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# column, label, higher is better, what the number is
COLUMNS = (("clip_t", "CLIP-T", True), ("clip_i", "CLIP-I", True), ("dreamsim", "DreamSim", False),
           ("dino", "DINO", True), ("face_distance", "Face dist.", False), ("face_same", "Same face", True))
# One-Prompt-One-Story Table 1 (ConsiStory+, SDXL): CLIP-T, CLIP-I, DreamSim
TABLE1 = {"Vanilla SDXL": (0.9074, 0.8165, 0.5292), "IP-Adapter": (0.8458, 0.9429, 0.1462),
          "ConsiStory": (0.8769, 0.8737, 0.3188), "StoryDiffusion": (0.8877, 0.8755, 0.3212),
          "NPR": (0.8411, 0.8916, 0.2548), "1Prompt1Story": (0.8942, 0.9117, 0.1993)}
CONVENTIONS = {
    "clip_t": "CLIPScore: 2.5 x max(cos(image, prompt), 0) per frame, full frame, prompt cut at 77 tokens",
    "clip_i": "cosine of CLIP image embeddings, mean over all pairs of a story's frames, background removed if masked",
    "dreamsim": "1 - cos of DreamSim single-branch DINO ViT-B/16 embeddings (frames resized to 224 x 224), mean "
                "over pairs; lower is more alike (the DreamSim ensemble is not supported yet)",
    "dino": "cosine of DINOv2 class tokens (224 centre crop), mean over pairs",
    "face_distance": "Euclidean distance of dlib ResNet face descriptors (largest face), mean over pairs with faces",
    "face_same": "share of pairs under dlib's published 0.6 threshold (same person)",
}


class EvalError(ValueError):
    pass


def _natural(path: Path) -> list:
    """frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def register(sub) -> None:
    """Add the `eval` subcommand to the runner's parser."""
    p = sub.add_parser("eval", help="score the consistency of generated stories (CLIP-T, CLIP-I, DreamSim, DINO, face)",
                       description=__doc__)
    p.add_argument("source", nargs="?", help="a folder of frames or story subfolders, or a batch manifest (.jsonl)")
    p.add_argument("--out", help="folder for the report (default: storykit-eval/ beside the frames); every run adds "
                                 "a new numbered report, never replacing one")
    p.add_argument("--models", help="a models folder laid out like ComfyUI/models (clip_vision/, clip/, dinov2/, ...)")
    for kind in ("clip", "dino", "dreamsim", "face"):
        p.add_argument(f"--{kind}", help=f"the {kind} model: a file or a local folder ('none' turns the metric off)")
    p.add_argument("--clip-text", help="with a CLIP-vision file as --clip: the text encoder of the same CLIP for "
                                       "CLIP-T (clip_l / clip_g .safetensors; default: found in models/clip, "
                                       "models/text_encoders)")
    p.add_argument("--masks", help="a folder of subject masks named like the frames (white = subject) for the "
                                   "identity metrics; frames with an alpha channel use it by default")
    p.add_argument("--label", default="this run", help="the name of your row in the comparison table")
    p.add_argument("--write-consistory", metavar="FILE",
                   help="write the 192 ConsiStory+ stories (.yaml or .json) for the batch runner, and stop")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(handler=main)


# ----------------------------------------------------------------------------------------------- stories
def _png_prompts(info: dict, count: int) -> list[str] | None:
    """Frame prompts from the API prompt ComfyUI stores in a PNG: a Story Prompt's or One-Prompt-One-Story's frames,
    else the text of the prompt node wired to a sampler's positive input."""
    try:
        prompt = json.loads(info.get("prompt", ""))
    except ValueError:
        return None
    if not isinstance(prompt, dict):
        return None
    for node in prompt.values():
        inputs, kind = node.get("inputs", {}), node.get("class_type", "")
        if kind == "StoryKitStoryPrompt" and isinstance(inputs.get("story"), str):
            from ..kernels import story_plan
            style = inputs.get("custom_style") if isinstance(inputs.get("custom_style"), str) else ""
            if not style.strip() and inputs.get("style") not in (None, "(none)"):
                from ..nodes.nodes_consistent_attention import STYLES
                style = STYLES.get(inputs["style"], ("", ""))[0]
            return [f.prompt for f in story_plan.parse_story(inputs["story"], style).frames]
        if kind == "StoryKitOnePromptStoryEncode" and isinstance(inputs.get("frame_prompts"), str):
            identity = inputs.get("identity_prompt", "") if isinstance(inputs.get("identity_prompt"), str) else ""
            return [f"{identity} {line.strip()}".strip() for line in inputs["frame_prompts"].splitlines() if line.strip()]
    for node in prompt.values():
        positive = node.get("inputs", {}).get("positive")
        if isinstance(positive, list) and str(positive[0]) in prompt:
            text = prompt[str(positive[0])].get("inputs", {}).get("text")
            if isinstance(text, str):
                return [text] * count
    return None


def _read_frame(path: Path, mask_dir: Path | None, root: Path) -> tuple[torch.Tensor, torch.Tensor | None, str, dict]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file (the manifest or folder names it)")
    try:
        with Image.open(path) as img:
            img.load()
            info = dict(img.info)
            rgba = img.convert("RGBA")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
        raise EvalError(f"{path}: cannot read this image ({exc}); is the file corrupt or cut short?") from exc
    arr = np.asarray(rgba, dtype=np.float32) / 255.0
    image = torch.from_numpy(arr[..., :3].copy())
    mask, how = None, "none"
    if mask_dir is not None:
        candidates = [mask_dir / path.relative_to(root).with_suffix(s) for s in (".png", path.suffix)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EvalError(f"--masks {mask_dir}: no mask for {path.relative_to(root)} (looked for "
                            f"{candidates[0]}); give every frame a mask or none")
        with Image.open(found) as m:
            mask = torch.from_numpy(np.asarray(m.convert("L"), dtype=np.float32) / 255.0)
        how = "mask files"
    elif arr[..., 3].min() < 1.0:
        mask, how = torch.from_numpy(arr[..., 3].copy()), "alpha channel"
    return image, mask, how, info


def collect(source: Path) -> list[dict]:
    """[{id, files, prompts|None, status, error}] from a manifest, story subfolders or one run's frames."""
    if source.is_file():
        return _from_manifest(source)
    if not source.is_dir():
        raise EvalError(f"{source}: no such file or folder; give a folder of frames or a batch manifest (.jsonl)")
    manifest = source / "manifest.jsonl"
    if manifest.is_file():
        return _from_manifest(manifest)
    frames = sorted((p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural)
    subfolders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith((".", "storykit-eval")))
    stories = []
    for folder in subfolders:
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural)
        if files:
            stories.append({"id": folder.name, "files": files, "prompts": None, "status": "done", "error": None})
    if frames:
        stories += _group_runs(source, frames)
    if not stories:
        raise EvalError(f"{source}: no frames here ({', '.join(IMAGE_SUFFIXES)}), no story subfolders and no "
                        "manifest.jsonl; point eval at the folder the runner or the batch runner wrote")
    return stories


def _group_runs(source: Path, frames: list[Path]) -> list[dict]:
    """Frames one Save Image node wrote in one run share a file prefix and the workflow in their metadata: one story.
    A lone frame of a run that saved a bigger batch too (the comic page) is not a story of its own."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in frames:
        try:
            with Image.open(path) as img:
                meta = img.info.get("prompt", "")
        except Exception:  # noqa: BLE001 - a broken frame is reported when its story is read
            meta = ""
        groups.setdefault((re.sub(r"_\d+_?$", "", path.stem), meta), []).append(path)
    sizes: dict[str, int] = {}
    for (_, meta), files in groups.items():
        sizes[meta] = max(sizes.get(meta, 0), len(files))
    stories, seen = [], {}
    for (prefix, meta), files in groups.items():
        if len(files) == 1 and meta and sizes[meta] > 1:
            log.info("StoryKit eval: %s is another output of a run (e.g. its comic page), not a story", files[0])
            continue
        seen[prefix] = seen.get(prefix, 0) + 1
        name = prefix if seen[prefix] == 1 else f"{prefix}-{seen[prefix]}"
        stories.append({"id": name, "files": files, "prompts": None, "status": "done", "error": None})
    return stories


def _from_manifest(path: Path) -> list[dict]:
    stories = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            story_id, files = str(row["story_id"]), row.get("files") or []
        except (ValueError, KeyError, TypeError) as exc:
            raise EvalError(f"{path} line {number}: not a manifest row ({exc}); each line is a JSON object with "
                            "story_id, files, prompts, status") from exc
        prompts = row.get("prompts") or None
        if prompts is not None and len(prompts) != len(files):
            raise EvalError(f"{path} line {number} ({story_id}): {len(prompts)} prompts for {len(files)} files")
        if prompts is not None and any(p is None for p in prompts):
            # the batch runner lists every picture a story saved; one without a prompt (its comic page) is no frame
            framed = [(f, p) for f, p in zip(files, prompts, strict=True) if p is not None]
            files, prompts = [f for f, _ in framed], ([p for _, p in framed] or None)
        stories.append({"id": story_id, "files": [path.parent / f for f in files], "prompts": prompts,
                        "status": row.get("status", "done"), "error": row.get("error"),
                        "settings": row.get("settings"), "seconds": row.get("seconds")})
    if not stories:
        raise EvalError(f"{path}: the manifest has no stories")
    return stories


# ----------------------------------------------------------------------------------------------- scoring
def score(stories: list[dict], models, mask_dir: Path | None, root: Path) -> list[dict]:
    from ..nodes import eval_models as em
    results = []
    for story in stories:
        row = {"id": story["id"], "files": [str(f) for f in story["files"]], "status": story["status"],
               "error": story.get("error"), "metrics": {}, "notes": [], "thumbnails": []}
        if story["status"] != "done":
            row["notes"].append(f"not scored: the batch run reports {story['status']} ({story.get('error')})")
            results.append(row)
            continue
        try:
            if not story["files"]:
                raise EvalError("the story has no frames")
            frames = [_read_frame(Path(f), mask_dir, root) for f in story["files"]]
            images = [f[0] for f in frames]
            masks = [f[1] for f in frames]
            how = {f[2] for f in frames}
            if len(how) > 1:
                masks, how = None, {"none (only some frames have one)"}
            prompts = story["prompts"]
            if prompts is None:
                try:
                    prompts = _png_prompts(frames[0][3], len(images))
                except ValueError as exc:
                    row["notes"].append(f"the prompts in the PNG metadata do not parse ({exc}): CLIP-T left empty")
            if prompts is not None and len(prompts) != len(images):
                row["notes"].append(f"the PNG metadata names {len(prompts)} frame prompts for {len(images)} "
                                    "frames: CLIP-T left empty")
                prompts = None
            if len({tuple(i.shape) for i in images}) > 1:
                row["notes"].append("frames of different sizes: each is fitted to the model input on its own")
            result = em.score_story(models, images, prompts, None if masks is None or masks[0] is None else masks)
        except (EvalError, ValueError) as exc:
            row.update(status="error", error=str(exc))
            results.append(row)
            continue
        row.update(metrics=result["metrics"], matrices=result["matrices"], masks=how.pop(), prompts=prompts,
                   clip_t_per_frame=result.get("clip_t_per_frame"), faces_found=result.get("faces_found"))
        row["notes"] += result["notes"]
        row["thumbnails"] = [_thumbnail(i) for i in images]
        results.append(row)
    return results


def _thumbnail(image: torch.Tensor, size: int = 160) -> str:
    img = Image.fromarray((image.numpy() * 255).round().clip(0, 255).astype(np.uint8))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mean(row: dict, key: str) -> float | None:
    return (row["metrics"].get(key) or {}).get("mean")


def worst_first(rows: list[dict]) -> list[dict]:
    """Failed stories first, then by the first identity metric every story has (lowest CLIP-I / DINO first)."""
    def key(row):
        for name, higher in (("clip_i", True), ("dino", True), ("dreamsim", False), ("face_same", True)):
            value = _mean(row, name)
            if value is not None:
                return (row["status"] == "done", value if higher else -value)
        return (row["status"] == "done", 0.0)
    return sorted(rows, key=key)


def table(rows: list[dict], label: str) -> tuple[dict, str]:
    """The benchmark row (mean and spread over stories) and a Table-1-style text table with the published rows."""
    from ..kernels import consistency as cons
    summary = {name: cons.aggregate([_mean(r, name) for r in rows]) for name, _, _ in COLUMNS}
    used = [c for c in COLUMNS if c[0] in ("clip_t", "clip_i", "dreamsim") or summary[c[0]]["n"]]  # Table 1's first
    head = ["Method"] + [f"{lab} {'↑' if up else '↓'}" for _, lab, up in used]
    lines = [head, [label] + [f"{summary[n]['mean']:.4f} ± {summary[n]['std']:.4f}" if summary[n]["n"] else "-"
                              for n, _, _ in used]]
    for method, values in TABLE1.items():
        published = dict(zip(("clip_t", "clip_i", "dreamsim"), values, strict=True))
        lines.append([f"{method} (1P1S Table 1)"] + [f"{published[n]:.4f}" if n in published else "-"
                                                       for n, _, _ in used])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
                     for line in [lines[0], ["-" * w for w in widths], *lines[1:]])
    return summary, text


def _matrix_html(row: dict) -> str:
    """The story's first identity pair matrix as a small table, the least alike pair marked."""
    matrices = row.get("matrices") or {}
    name = next((k for k in ("clip_i", "dino", "dreamsim", "face") if k in matrices), None)
    if name is None:
        return ""
    m = matrices[name]
    n = len(m)
    off = [(m[i][j], i, j) for i in range(n) for j in range(n) if i < j and m[i][j] is not None]
    worst = (min if name in ("clip_i", "dino") else max)(off)[1:] if off else None
    head = "".join(f"<th>{j + 1}</th>" for j in range(n))
    body = "".join(f"<tr><th>{i + 1}</th>" + "".join(
        f"<td{' class=bad' if worst and (i, j) in (worst, worst[::-1]) else ''}>"
        + ("-" if m[i][j] is None else f"{m[i][j]:.3f}") + "</td>" for j in range(n))
        + "</tr>" for i in range(n))
    return f"<details><summary>{name} per pair</summary><table><tr><th></th>{head}</tr>{body}</table></details>"


def _html(report: dict, rows: list[dict], table_text: str) -> str:
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>StoryKit consistency report</title><style>",
           "body{font-family:sans-serif;margin:2em;background:#fafafa}section{background:#fff;border:1px solid #ddd;"
           "border-radius:6px;padding:1em;margin:1em 0}figure{display:inline-block;margin:4px;text-align:center;"
           "font-size:12px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
           ".bad{color:#b00}pre{background:#f4f4f4;padding:1em}</style></head><body>",
           f"<h1>StoryKit consistency report</h1><p>{esc(report['source'])} · {len(rows)} stories · "
           f"{esc(report['created'])}</p><pre>{esc(table_text)}</pre><p>Models: "
           + "; ".join(f"{esc(k)}: {esc(v)}" for k, v in report["models"].items()) + "</p>"]
    for kind, why in report["missing"].items():
        out.append(f"<p class='bad'>{esc(kind)} not scored: {esc(why)}</p>")
    out.append("<p>Stories are listed worst first.</p>")
    for row in rows:
        out.append(f"<section id='{esc(row['id'])}'><h2>{esc(row['id'])}</h2>")
        if row["status"] != "done":
            out.append(f"<p class='bad'>{esc(row['status'])}: {esc(str(row.get('error')))}</p>")
        cells = "".join(f"<th>{esc(lab)}</th>" for _, lab, _ in COLUMNS)
        values = "".join("<td>" + ("-" if _mean(row, n) is None else f"{_mean(row, n):.4f}") + "</td>"
                         for n, _, _ in COLUMNS)
        out.append(f"<table><tr>{cells}<th>masks</th></tr><tr>{values}<td>{esc(row.get('masks', '-'))}</td></tr>"
                   "</table><div>")
        for i, thumb in enumerate(row["thumbnails"]):
            caption = [f"frame {i + 1}"]
            if row.get("clip_t_per_frame"):
                caption.append(f"CLIP-T {row['clip_t_per_frame'][i]:.3f}")
            if row.get("faces_found") and not row["faces_found"][i]:
                caption.append("<span class='bad'>no face</span>")
            title = esc(row["prompts"][i]) if row.get("prompts") else ""
            out.append(f"<figure><img src='data:image/jpeg;base64,{thumb}' title='{title}'><figcaption>"
                       + " · ".join(caption) + "</figcaption></figure>")
        out.append("</div>" + _matrix_html(row) + "".join(f"<p>{esc(n)}</p>" for n in row["notes"]) + "</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(out_dir: Path, report: dict, rows: list[dict], table_text: str) -> Path:
    """Write the report into a temporary folder, then rename it to the next free eval_NNNNN: a report is complete or
    absent, and an earlier one is never replaced."""
    from ..kernels.safefiles import numbered_path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".eval-"))
    try:
        plain = [{k: v for k, v in r.items() if k != "thumbnails"} for r in rows]
        (tmp / "report.json").write_text(json.dumps({**report, "stories": plain}, indent=1), encoding="utf-8")
        with open(tmp / "report.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["story_id", "status", "frames", "masks"] + [n for n, _, _ in COLUMNS] + ["notes"])
            for r in plain:
                writer.writerow([r["id"], r["status"], len(r["files"]), r.get("masks", "")]
                                + ["" if _mean(r, n) is None else f"{_mean(r, n):.6f}" for n, _, _ in COLUMNS]
                                + ["; ".join(r["notes"] + ([r["error"]] if r.get("error") else []))])
        (tmp / "table.md").write_text(table_text + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(_html(report, rows, table_text), encoding="utf-8")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        final = Path(numbered_path(out_dir, "eval", ext=""))
        os.rename(tmp, final)
        return final
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


def evaluate(source: str | Path, models, out: str | Path | None = None, mask_dir: str | Path | None = None,
             label: str = "this run") -> tuple[Path, dict, str]:
    """Collect, score and write; returns (report folder, report, table text)."""
    source = Path(source).expanduser().resolve()
    stories = collect(source)
    root = source if source.is_dir() else source.parent
    started = time.perf_counter()
    rows = worst_first(score(stories, models, Path(mask_dir) if mask_dir else None, root))
    summary, text = table([r for r in rows if r["status"] == "done"], label)
    consistory = all(r["id"].startswith("consistory+/") for r in rows)
    note = ("ConsiStory+ stories: the rows below compare directly (1P1S used SDXL and CarveKit masks)" if consistory
            else "not the ConsiStory+ set: the published rows are a yardstick, not a like-for-like comparison")
    report = {"source": str(source), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "models": models.sources(),
              "missing": models.missing, "conventions": CONVENTIONS, "summary": summary, "table1": TABLE1,
              "comparison_note": note, "seconds": round(time.perf_counter() - started, 2)}
    out_dir = Path(out) if out else root / "storykit-eval"
    return write_report(out_dir, report, rows, text), report, f"{text}\n{note}"


def main(args) -> int:
    if args.write_consistory:
        from . import consistory
        sys.stdout.write(f"{consistory.write_stories(args.write_consistory)}\n")
        return 0
    if not args.source:
        sys.stderr.write("storykit eval: give a folder of frames or a manifest (or --write-consistory FILE)\n")
        return 2
    from . import host
    host.boot(models_dir=args.models)
    from ..nodes import eval_models as em
    models = em.load_models({k: getattr(args, k) for k in ("clip", "clip_text", "dino", "dreamsim", "face")})
    if not models.sources():
        sys.stderr.write("storykit eval: no metric can run, no model was found:\n"
                         + "\n".join(models.missing.values()) + "\n")
        return 2
    for kind, why in models.missing.items():
        sys.stderr.write(f"storykit eval: {kind} skipped: {why}\n")
    try:
        folder, _, text = evaluate(args.source, models, args.out, args.masks, args.label)
    except EvalError as exc:
        sys.stderr.write(f"storykit eval: {exc}\n")
        return 2
    sys.stdout.write(f"{text}\n{folder / 'report.html'}\n")
    return 0
