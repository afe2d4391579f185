"""The consistency metrics' models, found on disk and never downloaded: CLIP, DINOv2, DreamSim and dlib's face model.

Where they come from, first match wins:
- a path the user gives (a file for the host's CLIP-vision loader, or a local transformers folder);
- ComfyUI's model folders: `clip_vision` files through comfy.clip_vision (CLIP ViT-L/H/G, DINOv2), transformers
  folders (config.json + weights) inside `clip_vision`, `clip`, `text_encoders`, `dinov2`, `dino`, `dreamsim`;
- the local Hugging Face cache (read only, offline);
- dlib's face models from the `face-recognition-models` package.
A missing model raises ModelMissing, which names every place looked in and the files it accepts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..kernels import consistency as cons

log = logging.getLogger("storykit")

METRICS = ("clip_t", "clip_i", "dreamsim", "dino", "face")
FACE_THRESHOLD = 0.6  # dlib's published threshold for its ResNet descriptors (99.38% on LFW)

ACCEPTS = {
    "clip": "a full CLIP as a transformers folder (config.json with model_type 'clip', model.safetensors, vocab.json, "
            "merges.txt; e.g. openai/clip-vit-large-patch14), or for CLIP-I only a CLIP-vision file in "
            "models/clip_vision (clip_vision_l / ViT-H / ViT-bigG .safetensors)",
    "dino": "a DINOv2 transformers folder (config.json with model_type 'dinov2', e.g. facebook/dinov2-base) or a "
            "DINOv2 file in models/clip_vision",
    "dreamsim": "a DreamSim single-branch DINO ViT-B/16 with its LoRA merged, as a transformers folder (config.json "
                "with model_type 'vit' or 'dinov2') in models/dreamsim",
    "face": "dlib's shape_predictor_5_face_landmarks.dat and dlib_face_recognition_resnet_model_v1.dat (pip install "
            "dlib-bin face-recognition-models), or a folder holding both",
}
FOLDERS = {"clip": ("clip_vision", "clip", "text_encoders"), "dino": ("dinov2", "dino", "clip_vision"),
           "dreamsim": ("dreamsim",)}
HF_REPOS = {"clip": ("openai--clip-vit-large-patch14", "openai--clip-vit-base-patch32", "openai--clip-vit-base-patch16"),
            "dino": ("facebook--dinov2-base", "facebook--dinov2-small", "facebook--dinov2-large"), "dreamsim": ()}
TRANSFORMERS_TYPES = {"clip": ("clip",), "dino": ("dinov2",), "dreamsim": ("vit", "dinov2")}


class ModelMissing(RuntimeError):
    def __init__(self, kind: str, looked: list[str], detail: str = ""):
        self.kind = kind
        where = "\n  ".join(looked) or "(no folder)"
        super().__init__(f"no {kind} model found{': ' + detail if detail else ''}. Looked in:\n  {where}\n"
                         f"It accepts {ACCEPTS[kind]}. Put one there or give its path; nothing is downloaded.")


def _model_bases() -> list[Path]:
    """ComfyUI's models folder and the parents of every registered clip_vision folder (--models, extra paths)."""
    try:
        import folder_paths
    except ImportError:
        return []
    bases = [Path(folder_paths.models_dir)]
    for name in ("clip_vision", "checkpoints"):
        try:
            bases += [Path(p).parent for p in folder_paths.get_folder_paths(name)]
        except KeyError:
            continue
    return list(dict.fromkeys(b.resolve() for b in bases))


def _folders(kind: str) -> list[Path]:
    found: list[Path] = []
    try:
        import folder_paths
    except ImportError:
        folder_paths = None
    for name in FOLDERS[kind]:
        if folder_paths is not None and name in folder_paths.folder_names_and_paths:
            found += [Path(p) for p in folder_paths.get_folder_paths(name)]
        found += [b / name for b in _model_bases()]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" /
                                                          "huggingface") / "hub")
    found += [hub / f"models--{repo}" / "snapshots" for repo in HF_REPOS[kind]]
    return list(dict.fromkeys(p.resolve() for p in found))


def _transformers_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def _safetensors_kind(path: Path) -> str | None:
    """'clip' or 'dino' from a clip_vision file's tensor names (header only, nothing loaded)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file we can read: not a candidate
        return None
    if any(k.endswith("layer_scale1.lambda1") for k in keys):
        return "dino"
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in keys or "vision_model.embeddings.class_embedding" in keys:
        return None if any("siglip" in k or k.startswith("vision_model.head.") for k in keys) else "clip"
    return None


def find_model(kind: str, path: str | None = None) -> tuple[str, Path]:
    """('transformers' | 'clip_vision', path) for `kind`; raises ModelMissing naming where it looked."""
    if path:
        p = Path(path).expanduser()
        if p.is_dir() and _transformers_type(p) in TRANSFORMERS_TYPES[kind]:
            return "transformers", p
        if p.is_file() and kind in ("clip", "dino") and _safetensors_kind(p) == kind:
            return "clip_vision", p
        raise ModelMissing(kind, [str(p)], f"{p} is not one ({'missing' if not p.exists() else 'wrong kind'})")
    looked: list[str] = []
    for folder in _folders(kind):
        looked.append(str(folder))
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.is_dir() and _transformers_type(child) in TRANSFORMERS_TYPES[kind]:
                return "transformers", child
        if folder.name == "clip_vision":
            for child in sorted(folder.glob("*.safetensors")):
                if _safetensors_kind(child) == kind:
                    return "clip_vision", child
    raise ModelMissing(kind, looked)


def image_key(image: torch.Tensor, extra: bytes = b"") -> str:
    return hashlib.sha1(image.detach().cpu().float().numpy().tobytes() + extra).hexdigest()


@dataclass
class Encoder:
    """One image (and for CLIP text) encoder. Features are cached per frame, so pair matrices cost one pass."""
    kind: str
    source: str
    encode: object                    # (N, H, W, C) -> (N, D)
    encode_text: object = None        # list[str] -> (N, D), CLIP folders only
    batch: int = 8
    cache: dict = field(default_factory=dict)
    text_missing: str = ""            # why CLIP-T has no text side, when it has none

    def features(self, images, masks=None) -> torch.Tensor:
        """(N, D) features of a (N, H, W, C) batch or a list of (H, W, C) frames (sizes may differ), each frame
        encoded once: a frame seen before (same pixels and mask) comes from the cache."""
        masks = [None] * len(images) if masks is None else masks
        keys = [image_key(images[i], b"" if masks[i] is None else masks[i].cpu().numpy().tobytes())
                for i in range(len(images))]
        todo: dict[tuple, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                todo.setdefault((tuple(images[i].shape), masks[i] is None), []).append(i)
        for group in todo.values():
            for start in range(0, len(group), self.batch):
                idx = group[start:start + self.batch]
                x = torch.stack([images[i] for i in idx])
                if masks[idx[0]] is not None:
                    x = cons.apply_masks(x, torch.stack([masks[i] for i in idx]))
                with torch.inference_mode():
                    out = self.encode(x).float().cpu()
                for i, row in zip(idx, out, strict=True):
                    self.cache[keys[i]] = row
        return torch.stack([self.cache[k] for k in keys])


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _processor_config(folder: Path, size: int, mean, std) -> tuple[int, tuple, tuple]:
    try:
        cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return size, mean, std
    crop = cfg.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return int(crop), tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))


def _device() -> torch.device:
    try:
        import comfy.model_management as mm
        return mm.text_encoder_device()
    except Exception:  # noqa: BLE001 - without the host: CPU
        return torch.device("cpu")


def _load_transformers(kind: str, folder: Path) -> Encoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never reach for the hub
    import transformers
    device = _device()
    mtype = _transformers_type(folder)
    if mtype == "clip":
        model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        size, mean, std = _processor_config(folder, model.config.vision_config.image_size, cons.CLIP_MEAN,
                                            cons.CLIP_STD)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

        def encode(x):
            return _pooled(model.get_image_features(pixel_values=cons.preprocess(x, size, mean, std).to(device)))

        def encode_text(texts):
            tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
            with torch.inference_mode():
                return _pooled(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()})).float().cpu()

        return Encoder(kind, f"transformers CLIP {folder}", encode, encode_text)
    cls = transformers.Dinov2Model if mtype == "dinov2" else transformers.ViTModel
    model = cls.from_pretrained(str(folder), local_files_only=True, **({} if mtype == "dinov2" else
                                                                       {"add_pooling_layer": False})).eval().to(device)
    crop = kind != "dreamsim"  # DreamSim resizes the whole frame to 224 x 224
    # DINOv2 interpolates its position embeddings and is evaluated at 224; a plain ViT needs its own size
    size = 224 if mtype == "dinov2" else model.config.image_size
    size, mean, std = _processor_config(folder, size, cons.IMAGENET_MEAN, cons.IMAGENET_STD)

    def encode_vit(x):
        out = model(pixel_values=cons.preprocess(x, size, mean, std, crop=crop).to(device))
        return out.last_hidden_state[:, 0]  # the class token after the final norm (DINOv2's and DreamSim's embedding)

    return Encoder(kind, f"transformers {mtype} {folder}", encode_vit)


def _load_clip_vision(kind: str, path: Path) -> Encoder:
    import comfy.clip_vision
    model = comfy.clip_vision.load(str(path))
    if model is None:
        raise ModelMissing(kind, [str(path)], "the host's CLIP-vision loader does not recognise this file")
    return Encoder(kind, f"clip_vision {path.name} (comfy.clip_vision)",
                   lambda x: model.encode_image(x, crop=True)["image_embeds"])


def _header(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a safetensors file, read from its header only."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _projection_dim(keys: dict, name: str) -> int | None:
    if f"{name}.weight" in keys:
        return keys[f"{name}.weight"][0]
    return keys[name][1] if name in keys else None  # the old (in, out) layout CLIPSave wrote


def find_text_encoder(image_dim: int, path: str | None = None) -> Path:
    """The CLIP text encoder file that matches a CLIP-vision file's embedding: CLIP-L (768, pairs with ViT-L/14
    vision) or CLIP-G (1280, pairs with ViT-bigG), with its text projection; from models/clip, models/text_encoders."""
    candidates = [Path(path).expanduser()] if path else []
    looked = [str(c) for c in candidates]
    if not path:
        for folder in _folders("clip"):
            if folder.name in ("clip", "text_encoders"):
                looked.append(str(folder))
                candidates += sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for candidate in candidates:
        try:
            keys = _header(candidate)
        except Exception:  # noqa: BLE001 - not a readable safetensors file: not a candidate
            continue
        if "text_model.embeddings.token_embedding.weight" in keys and _projection_dim(keys, "text_projection") \
                == image_dim:
            return candidate
    raise ModelMissing("clip", looked, f"no CLIP text encoder with a {image_dim}-wide text projection to pair with "
                       "the CLIP-vision file for CLIP-T (clip_l.safetensors pairs with ViT-L/14 vision, clip_g with "
                       "ViT-bigG; the text encoder inside an SD1.5 checkpoint lacks the projection)")


def _host_text_side(path: Path):
    """CLIP-T's text side through the host's text-encoder loader (comfy.sd.load_clip, as the Load CLIP node does):
    the pooled output at the end token, projected; the prompt's first 77 tokens."""
    import comfy.sd
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    projection = sd["text_projection.weight"] if "text_projection.weight" in sd else sd["text_projection"].T
    clip_g = "text_model.encoder.layers.31.mlp.fc1.weight" in sd
    del sd
    clip = comfy.sd.load_clip([str(path)], embedding_directory=None)

    def encode_text(texts):
        rows = []
        with torch.inference_mode():
            for text in texts:
                tokens = {k: v[:1] for k, v in clip.tokenize(text).items()}
                _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                rows.append(pooled[0].float().cpu())
        pooled = torch.stack(rows)
        # the host's CLIP-G pooled output is projected already; its CLIP-L (SD1) output is not
        return pooled if clip_g else pooled @ projection.float().cpu().T

    return encode_text


def load_encoder(kind: str, path: str | None = None, text_path: str | None = None) -> Encoder:
    how, where = find_model(kind, path)
    log.info("StoryKit eval: %s from %s", kind, where)
    if how == "transformers":
        return _load_transformers(kind, where)
    encoder = _load_clip_vision(kind, where)
    if kind == "clip" and text_path != "none":
        image_dim = _projection_dim(_header(where), "visual_projection") or \
            _projection_dim(_header(where), "visual.proj")
        try:
            text_file = find_text_encoder(image_dim, text_path)
        except ModelMissing as exc:
            encoder.text_missing = str(exc)
            log.warning("StoryKit eval: %s", exc)
            return encoder
        encoder.encode_text = _host_text_side(text_file)
        encoder.source += f" + text {text_file.name} (comfy.sd.load_clip)"
    return encoder


class FaceModel:
    """dlib: HOG face detector, 5-point landmarks, ResNet-34 128-d descriptor (Euclidean distance, 0.6 threshold)."""

    FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")

    def __init__(self, folder: str | None = None):
        import dlib
        looked = [folder] if folder else []
        if not folder:
            spec = importlib.util.find_spec("face_recognition_models")  # never imported: it needs pkg_resources
            looked = [str(Path(p) / "models") for p in (spec.submodule_search_locations or [])] if spec else \
                ["(the face_recognition_models package is not installed)"]
        for place in looked:
            files = [Path(place) / name for name in self.FILES]
            if all(f.is_file() for f in files):
                break
        else:
            raise ModelMissing("face", looked)
        self.source = f"dlib ResNet {files[1]}"
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(files[0]))
        self.net = dlib.face_recognition_model_v1(str(files[1]))
        self.cache: dict[str, np.ndarray | None] = {}

    def descriptor(self, image: torch.Tensor) -> np.ndarray | None:
        """The largest face's 128-d descriptor, or None when no face is found."""
        key = image_key(image)
        if key not in self.cache:
            rgb = np.ascontiguousarray((image[..., :3].cpu().float().numpy() * 255).round().clip(0, 255)
                                       .astype(np.uint8))
            faces = self.detector(rgb, 1)
            if len(faces) == 0:
                self.cache[key] = None
            else:
                face = max(faces, key=lambda r: r.width() * r.height())
                shape = self.landmarks(rgb, face)
                self.cache[key] = np.asarray(self.net.compute_face_descriptor(rgb, shape), dtype=np.float32)
        return self.cache[key]


@dataclass
class Models:
    """The loaded encoders (None where missing) and, for each missing one, why."""
    clip: Encoder | None = None
    dino: Encoder | None = None
    dreamsim: Encoder | None = None
    face: FaceModel | None = None
    missing: dict = field(default_factory=dict)

    def sources(self) -> dict:
        return {k: getattr(self, k).source for k in ("clip", "dino", "dreamsim", "face") if getattr(self, k)}


def load_models(paths: dict | None = None, wanted=("clip", "dino", "dreamsim", "face")) -> Models:
    """Load each wanted model; a missing one is recorded (its metrics are skipped), the others still load. paths may
    name "clip_text" too: the text encoder for CLIP-T beside a CLIP-vision file."""
    paths = paths or {}
    models = Models()
    for kind in wanted:
        if paths.get(kind) == "none":
            models.missing[kind] = "turned off"
            continue
        try:
            value = FaceModel(paths.get(kind)) if kind == "face" else \
                load_encoder(kind, paths.get(kind), paths.get("clip_text") if kind == "clip" else None)
        except (ModelMissing, ImportError) as exc:
            models.missing[kind] = str(exc)
            log.warning("StoryKit eval: %s", exc)
            continue
        setattr(models, kind, value)
    return models


def score_story(models: Models, images: torch.Tensor, prompts: list[str] | None = None,
                masks: torch.Tensor | None = None) -> dict:
    """Every available metric for one story's frames: per-frame CLIP-T and faces, pair matrices, summaries."""
    n = len(images)
    result: dict = {"frames": n, "metrics": {}, "matrices": {}, "notes": [], "masks": "none" if masks is None
                    else "given"}
    if n < 2:
        result["notes"].append("one frame: identity metrics need at least two frames (left empty)")
    if models.clip is not None:
        feats = models.clip.features(images, masks)
        if n >= 2:
            matrix = cons.cosine_matrix(feats)
            result["matrices"]["clip_i"] = matrix.tolist()
            result["metrics"]["clip_i"] = cons.summary(cons.pair_values(matrix))
        if prompts and models.clip.encode_text is not None:
            if len(prompts) != n:
                raise ValueError(f"{len(prompts)} prompts for {n} frames: give one prompt per frame")
            full = models.clip.features(images)  # CLIP-T looks at the whole frame, background included
            scores = cons.clip_score(full, models.clip.encode_text(prompts))
            result["clip_t_per_frame"] = scores.tolist()
            result["metrics"]["clip_t"] = cons.summary(scores.tolist())
        elif prompts:
            result["notes"].append("CLIP-T needs a CLIP text side: " + (models.clip.text_missing or
                                                                         "this CLIP has none"))
        elif models.clip.encode_text is not None:
            result["notes"].append("no prompts: CLIP-T left empty")
    for kind, name, matrix_of in (("dino", "dino", cons.cosine_matrix),
                                  ("dreamsim", "dreamsim", lambda f: 1.0 - cons.cosine_matrix(f))):
        encoder = getattr(models, kind)
        if encoder is not None and n >= 2:
            matrix = matrix_of(encoder.features(images, masks))
            result["matrices"][name] = matrix.tolist()
            result["metrics"][name] = cons.summary(cons.pair_values(matrix))
    if models.face is not None:
        descriptors = [models.face.descriptor(images[i]) for i in range(n)]
        found = [d is not None for d in descriptors]
        result["faces_found"] = found
        missing = [i + 1 for i, f in enumerate(found) if not f]
        if missing:
            result["notes"].append("no face found in frame " + ", ".join(map(str, missing)))
        if sum(found) >= 2:
            feats = torch.from_numpy(np.stack([d if d is not None else np.zeros(128, np.float32)
                                               for d in descriptors]))
            matrix = cons.euclidean_matrix(feats)
            values = cons.pair_values(matrix, found)
            result["matrices"]["face"] = [[float(matrix[i, j]) if found[i] and found[j] else None for j in range(n)]
                                          for i in range(n)]  # None: a frame without a face
            result["metrics"]["face_distance"] = cons.summary(values)
            result["metrics"]["face_same"] = cons.summary([float(v < FACE_THRESHOLD) for v in values])
    return result
