"""Writing model files without ever losing one: atomic safetensors writes and numbered names (no host imports)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write to a temp file beside `path`, then rename: a cancelled or failed write never leaves a half file, and an
    existing file is never replaced unless `overwrite`."""
    import safetensors.torch
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _write_then_rename(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata or {}),
                              overwrite)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """`data` into `path` as atomic_save_safetensors writes: whole or not at all, never over a file unless asked."""
    return _write_then_rename(path, lambda tmp: Path(tmp).write_bytes(data), overwrite)


def _write_then_rename(path: str | os.PathLike, write, overwrite: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"StoryKit: refusing to overwrite {path}; choose another name")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any file the user saves
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def numbered_path(folder: str | os.PathLike, prefix: str, step: int | None = None, ext: str = ".safetensors") -> str:
    """A path that does not exist yet: prefix_00100.ext for a step (prefix_00100_1.ext if taken), else the first
    free prefix_00001.ext, prefix_00002.ext, ..."""
    os.makedirs(folder, exist_ok=True)
    if step is not None:
        path = os.path.join(folder, f"{prefix}_{step:05d}{ext}")
        n = 1
        while os.path.exists(path):
            path = os.path.join(folder, f"{prefix}_{step:05d}_{n}{ext}")
            n += 1
        return path
    n = 1
    while os.path.exists(os.path.join(folder, f"{prefix}_{n:05d}{ext}")):
        n += 1
    return os.path.join(folder, f"{prefix}_{n:05d}{ext}")


def file_in_folders(name: str, folders, suffixes=("",)) -> Path | None:
    """`name` (a file name, or a path relative to a folder) as a readable file inside one of `folders`; None when it
    is not there, not readable, or would leave the folder (an absolute path, '..'). Links inside a folder are kept:
    the check is on the path as written, as the host's own model lists do."""
    for folder in folders:
        base = os.path.abspath(folder)
        for suffix in suffixes:
            path = os.path.abspath(os.path.join(base, name + suffix))
            if os.path.commonpath([base, path]) == base and path != base and os.path.isfile(path) \
                    and os.access(path, os.R_OK):
                return Path(path)
    return None
