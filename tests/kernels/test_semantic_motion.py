"""The Semantic Motion Predictor's mathematics, without the host: interpolation, frame times, network, training, files."""
from __future__ import annotations

import os

import pytest
import torch

from storykit.kernels import safefiles
from storykit.kernels import semantic_motion as smp


def _pair(n=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("name", ["linear", "spherical"])
def test_interpolation_endpoints_are_the_encodings(name):
    a, b = _pair()
    path = smp.INTERPOLATIONS[name](a, b, torch.linspace(0, 1, 7))
    assert path.shape == (7, 5, 16)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)


def test_linear_is_the_papers_formula():
    a, b = _pair()
    t = torch.tensor([0.25])
    assert torch.allclose(smp.lerp(a, b, t)[0], 0.75 * a + 0.25 * b)


def test_spherical_keeps_norms_and_stays_on_the_arc():
    a, b = _pair()
    a, b = a / a.norm(dim=-1, keepdim=True) * 3.0, b / b.norm(dim=-1, keepdim=True) * 3.0
    t = torch.linspace(0, 1, 9)
    path = smp.slerp(a, b, t)
    assert torch.allclose(path.norm(dim=-1), torch.full((9, 5), 3.0), atol=1e-5)
    # linear interpolation shrinks the middle: the reason to offer the spherical path
    assert (smp.lerp(a, b, t)[4].norm(dim=-1) < 2.99).all()
    # unequal norms: the norm moves linearly from |a| to |b|
    c = b * 2
    mid = smp.slerp(a, c, torch.tensor([0.5]))[0]
    assert torch.allclose(mid.norm(dim=-1), torch.full((5,), 4.5), atol=1e-5)
    # the half-way direction bisects the angle
    ua, uc = a / a.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
    um = mid / mid.norm(dim=-1, keepdim=True)
    assert torch.allclose((um * ua).sum(-1), (um * uc).sum(-1), atol=1e-5)


def test_spherical_of_identical_encodings_is_constant():
    a, _ = _pair()
    assert torch.allclose(smp.slerp(a, a.clone(), torch.linspace(0, 1, 5)), a.expand(5, -1, -1), atol=1e-6)


def test_wan_frame_times_follow_the_4x_temporal_compression():
    wan = smp.LAYOUTS["wan21"]
    assert wan.latent_frames(81) == 21
    spans = wan.pixel_spans(81)
    assert spans[0] == (0, 0)
    assert all(spans[f] == (4 * f - 3, 4 * f) for f in range(1, 21))
    times = wan.frame_times(81)
    assert times[0] == 0 and times[-1] == 1
    assert torch.allclose(times, torch.tensor([4 * f / 80 for f in range(21)]))
    svd = smp.LAYOUTS["svd"]
    assert svd.pixel_spans(14) == [(i, i) for i in range(14)]
    assert torch.allclose(svd.frame_times(14), torch.linspace(0, 1, 14))


def _tiny_config(**kw):
    base = dict(embed_dim=12, tokens=3, hidden=32, layers=2, heads=4, embedding="test")
    base.update(kw)
    return smp.PredictorConfig(**base)


def test_default_sizes_are_the_papers():
    cfg = smp.PredictorConfig()
    assert (cfg.layers, cfg.hidden, cfg.heads) == (8, 1024, 16)
    with pytest.raises(ValueError, match="divisible"):
        smp.PredictorConfig(heads=12).validate()


def test_untrained_predictor_returns_the_interpolation():
    net = smp.SemanticMotionPredictor(_tiny_config())
    a, b = torch.randn(3, 12), torch.randn(3, 12)
    t = torch.linspace(0, 1, 6)
    assert torch.equal(smp.predict_trajectory(net, a, b, t), smp.lerp(a, b, t))
    with pytest.raises(ValueError, match="3 tokens of width 12"):
        net(torch.randn(1, 6, 4, 12), t)


def _synthetic_clips(count, frames, cfg, seed=0):
    """Clips whose middle frames are a known function of the ends: eased motion a + s(t) (b - a), s = smoothstep."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, frames)
    ends = torch.randn(count, 2, cfg.tokens, cfg.embed_dim, generator=g)
    s = (t * t * (3 - 2 * t)).view(1, -1, 1, 1)
    return t.expand(count, -1), ends[:, :1] + s * (ends[:, 1:] - ends[:, :1])


def test_training_lowers_the_loss_on_a_known_function_of_the_ends():
    cfg = _tiny_config()
    torch.manual_seed(0)
    net = smp.SemanticMotionPredictor(cfg)
    net.reset_parameters(seed=0)
    held_t, held = _synthetic_clips(16, 7, cfg, seed=1000)
    with torch.no_grad():
        before = smp.predictor_loss(net, held_t, held).item()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(80):
        times, clips = _synthetic_clips(16, 7, cfg, seed=step)  # fresh clips: it must learn the function
        loss = smp.predictor_loss(net, times, clips)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = smp.predictor_loss(net, held_t, held).item()
    assert after < 0.5 * before, (before, after)


def test_clip_training_pair_samples_the_layouts_frame_times():
    embeds = torch.arange(17, dtype=torch.float32).view(17, 1, 1)
    t, target = smp.clip_training_pair(embeds, 5, smp.LAYOUTS["wan21"])
    assert torch.allclose(t, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert target.flatten().tolist() == [0, 4, 8, 12, 16]


def test_saved_predictor_reloads_bit_identical(tmp_path):
    cfg = _tiny_config()
    net = smp.SemanticMotionPredictor(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    path = smp.save_predictor(net, str(tmp_path / "p.safetensors"), step=12)
    again, meta = smp.load_predictor(path)
    assert meta["config"]["hidden"] == 32 and meta["step"] == 12
    for (k, v), (k2, v2) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x, t = torch.randn(2, 4, 3, 12), torch.linspace(0, 1, 4)
    assert torch.equal(net.eval()(x, t), again(x, t))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_numbered_paths_never_overwrite(tmp_path):
    first = safefiles.numbered_path(str(tmp_path), "smp")
    open(first, "w").close()
    second = safefiles.numbered_path(str(tmp_path), "smp")
    assert first != second and second.endswith("smp_00002.safetensors")
    at = safefiles.numbered_path(str(tmp_path), "run", step=10)
    open(at, "w").close()
    assert safefiles.numbered_path(str(tmp_path), "run", step=10) != at


def test_reading_a_foreign_file_names_the_fix(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a Semantic Motion Predictor"):
        smp.load_predictor(str(tmp_path / "x.safetensors"))


def _tampered(tmp_path, name, config_json=None, tensors=None):
    """A small predictor file whose metadata or tensors were changed after saving."""
    from safetensors.torch import save_file
    net = smp.SemanticMotionPredictor(_tiny_config())
    meta = smp.predictor_metadata(net.config, step=1)
    if config_json is not None:
        meta[smp.METADATA_KEY] = config_json
    path = str(tmp_path / name)
    save_file(tensors if tensors is not None else net.state_dict(), path, meta)
    return path


@pytest.mark.parametrize("config,message", [
    ('{"embed_dim": 12, "tokens": 3, "hidden": 100000, "layers": 8, "heads": 8, "mlp_ratio": 4.0}',
     r"bad\.safetensors: its tensors do not match its config \(at .*the file holds"),
    ('{"embed_dim": 12, "tokens"', r"bad\.safetensors: the predictor config in its metadata is damaged"),
    ('{"embed_dim": "12", "tokens": 3}', r"bad\.safetensors: .*damaged \(embed_dim='12'\)"),
    ('{"embed_dim": 12, "tokens": 3, "colour": 1}', r"damaged \(colour=1\)"),
    ('[1, 2]', r"damaged \(it is not a JSON object\)"),
])
def test_damaged_predictor_files_fail_before_any_model_is_built(tmp_path, config, message):
    """An 18 KB file claiming hidden=100000 made the loader allocate ~1 GB before the shapes were checked."""
    path = _tampered(tmp_path, "bad.safetensors", config)
    with pytest.raises(ValueError, match=message):
        smp.load_predictor(path)


def test_unreadable_predictor_file_names_the_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a readable safetensors file"):
        smp.load_predictor(str(path))
    net = smp.SemanticMotionPredictor(_tiny_config())
    path = _tampered(tmp_path, "short.safetensors", tensors={k: v for k, v in list(net.state_dict().items())[1:]})
    with pytest.raises(ValueError, match="do not match its config"):
        smp.load_predictor(path)
