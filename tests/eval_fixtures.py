"""Random-weight encoders in the real layouts (transformers CLIP / DINOv2 / ViT folders, a ComfyUI clip_vision
file), written once into the StoryKit cache, and the face_recognition 1.3.0 test photographs from its PyPI sdist."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

FACE_SDIST = "face_recognition==1.3.0"
FACE_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def _cache() -> Path:
    from storykit.runner.cli import cache_dir
    return cache_dir()


def _tokenizer_dir() -> Path:
    import comfy.sd1_clip
    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"


def tiny_clip_dir(root: Path, seed: int = 0) -> Path:
    """A small CLIPModel (both towers, projections) with the real CLIP tokenizer files: the layout of
    openai/clip-vit-large-patch14, random weights."""
    import transformers
    folder = root / f"tiny-clip-{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=24)
    return write_clip_dir(folder, config)


def write_clip_dir(folder: Path, config) -> Path:
    """A random-weight transformers CLIPModel of `config`, with the real CLIP tokenizer files ComfyUI ships."""
    import transformers
    transformers.CLIPModel(config).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(_tokenizer_dir() / name, folder / name)
    return folder


def tiny_vit_dir(root: Path, model_type: str, seed: int = 0) -> Path:
    """A small DINOv2 (model_type 'dinov2') or DINO ViT (model_type 'vit', DreamSim's backbone) folder."""
    import transformers
    folder = root / f"tiny-{model_type}-{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
    if model_type == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **common), add_pooling_layer=False)
    model.save_pretrained(str(folder))
    return folder


def random_clip_vision_l(folder: Path, seed: int = 0) -> Path:
    """A full-size CLIP ViT-L/14 vision tower with random weights, in the keys comfy.clip_vision detects."""
    import comfy.clip_vision
    import safetensors.torch
    path = folder / "random_clip_vision_vitl.safetensors"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
    shapes = {k: v.shape for k, v in comfy.clip_vision.ClipVisionModel(str(config)).get_sd().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones(s) if k.endswith("norm1.weight") or k.endswith("norm2.weight") or "layernorm" in k
              or "layrnorm" in k else torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    safetensors.torch.save_file(sd, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path


def random_clip_l_text(folder: Path, seed: int = 0, projection: bool = True) -> Path:
    """A full-size CLIP-L text encoder (SD1.5's, with its text projection) with random weights, as clip_l.safetensors
    is laid out in models/text_encoders; projection=False: as it sits inside an SD1.5 checkpoint."""
    import comfy.sd1_clip
    import safetensors.torch
    path = folder / f"random_clip_l{'' if projection else '_noproj'}.safetensors"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: v.shape for k, v in comfy.sd1_clip.SDClipModel(device="cpu").transformer.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones(s) if "layer_norm" in k and k.endswith("weight") else torch.randn(s, generator=gen) * 0.02)
          .half() for k, s in shapes.items() if projection or "text_projection" not in k}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    safetensors.torch.save_file(sd, str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path


def face_photos() -> dict[str, Path]:
    """The public-domain test photographs of face_recognition 1.3.0, from its sdist on PyPI (fetched once)."""
    folder = _cache() / "fixtures" / "face_recognition-1.3.0"
    if not all((folder / n).is_file() for n in FACE_PHOTOS):
        download = _cache() / "fixtures" / "sdist"
        download.mkdir(parents=True, exist_ok=True)
        if not list(download.glob("face_recognition-1.3.0.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            FACE_SDIST, "-d", str(download)], check=True, capture_output=True)
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(next(download.glob("face_recognition-1.3.0.tar.gz"))) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in FACE_PHOTOS and "test_images" in member.name or name == "LICENSE":
                    (folder / name).write_bytes(tar.extractfile(member).read())
    return {n: folder / n for n in FACE_PHOTOS}
