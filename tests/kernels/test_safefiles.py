"""Model files are never half-written and never overwritten by accident."""
import os

import pytest
import torch
from safetensors.torch import load_file

from storykit.kernels import safefiles


def test_atomic_save_writes_reads_back_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "a.safetensors"
    safefiles.atomic_save_safetensors({"w": torch.arange(4.0)}, path, {"k": "v"})
    assert torch.equal(load_file(path)["w"], torch.arange(4.0))
    assert os.stat(path).st_mode & 0o044  # readable like a file the user saved, not 0600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        safefiles.atomic_save_safetensors({"w": torch.zeros(1)}, path)
    assert torch.equal(load_file(path)["w"], torch.arange(4.0))
    safefiles.atomic_save_safetensors({"w": torch.zeros(1)}, path, overwrite=True)
    assert load_file(path)["w"].shape == (1,)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]  # no temp file left


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "b.safetensors"
    with pytest.raises(AttributeError):  # a str has no .detach()
        safefiles.atomic_save_safetensors({"w": "not a tensor"}, path)
    assert list(tmp_path.iterdir()) == []
