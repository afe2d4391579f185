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


def _truncating_writer(monkeypatch, data: bytes, cut: int, crash: type[BaseException]):
    """Make the safetensors writer stop after `cut` bytes of the real file, as a full disk or a kill would."""
    import safetensors.torch

    def write_part(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(data[:cut])
        raise crash("simulated crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", write_part)


@pytest.mark.parametrize("crash", [OSError, KeyboardInterrupt])
def test_a_write_cut_anywhere_never_loses_or_half_writes_a_file(tmp_path, monkeypatch, crash):
    """Fault injection over a real predictor file, cut at each of its first 64 bytes, every 7th of the
    rest of its header and every 61st of its tensor data:
    the target is the old file or absent, never a prefix; the old file reads back unchanged; a cut-off temp file is
    removed; and the loader answers any prefix with a ValueError that names the file (not a crash, not a half
    model)."""
    from storykit.kernels import semantic_motion as smp
    net = smp.SemanticMotionPredictor(smp.PredictorConfig(embed_dim=4, tokens=1, hidden=8, layers=1, heads=2))
    ref = tmp_path / "ref.safetensors"
    smp.save_predictor(net, str(ref), step=3)
    data = ref.read_bytes()
    old = tmp_path / "old.safetensors"
    smp.save_predictor(smp.SemanticMotionPredictor(net.config), str(old), step=1)
    old_bytes = old.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cuts = [*range(64), *range(64, header_end, 7), header_end, *range(header_end + 1, len(data), 61), len(data) - 1]
    for cut in cuts:
        with monkeypatch.context() as m:
            _truncating_writer(m, data, cut, crash)
            with pytest.raises(crash):
                smp.save_predictor(net, str(old), step=3)          # replacing an existing file
            with pytest.raises(crash):
                smp.save_predictor(net, str(tmp_path / "new.safetensors"), step=3)  # a new file
        assert old.read_bytes() == old_bytes and not (tmp_path / "new.safetensors").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors", "ref.safetensors"]
    prefix = tmp_path / "cut.safetensors"
    for cut in cuts:
        prefix.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.safetensors"):
            smp.load_predictor(str(prefix))
    assert smp.load_predictor(str(ref))[1]["step"] == 3
