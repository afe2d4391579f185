"""The runner and the nodes against the host shapes of 0.3.64, 0.3.75 and the 0.4x line.

The host here is 0.3.75. Where a newer (or older) host differs, the test derives that host's shape from the real 0.3.75
class by the smallest change its source shows, and names the source it follows; the real 0.3.75 path runs too.
Sources read: ComfyUI 0.3.64 (the Comfy-Org/ComfyUI snapshot of 12 Oct 2025) and Comfy-Org/ComfyUI files newer than
0.3.75 (execution.py, main.py, comfy_execution/progress.py, comfy/model_patcher.py, comfy/sd.py, comfy_api/).
"""
from __future__ import annotations

import asyncio
import io as _io
import sys
from pathlib import Path

import pytest
import torch

# ---------------------------------------------------------------------------------------------- executor shapes
# 0.4x main.py, prompt_worker (the line the runner's main.py reader must understand):
MAIN_PY_04X = ('e = execution.PromptExecutor(server_instance, cache_type=cache_type, cache_args={ "lru" : '
               'args.cache_lru, "ram" : cache_ram, "ram_inactive" : cache_ram_inactive }, asset_manager=asset_manager )')
# 0.3.64 main.py, prompt_worker:
MAIN_PY_0364 = "e = execution.PromptExecutor(server_instance, cache_type=cache_type, cache_size=args.cache_lru)"


def executor_04x(execution):
    """0.3.75's PromptExecutor with 0.4x's constructor and its reads of cache_args."""
    class PromptExecutor04x(execution.PromptExecutor):
        # 0.4x execution.py: def __init__(self, server: "ExecutionServer", cache_type=False, cache_args=None,
        #                                  asset_manager: AssetManager | None = None)
        def __init__(self, server, cache_type=False, cache_args=None, asset_manager=None):
            super().__init__(server, cache_type=cache_type, cache_args=cache_args)
            self.asset_manager = asset_manager  # 0.4x: NoAssets(args) when None
            self.reads = []

        async def execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):  # noqa: B006 - host's
            # 0.4x execute_async, on every run before any node:
            #   ram_headroom = int(self.cache_args["ram"] * (1024 ** 3))
            #   ram_inactive_headroom = int(self.cache_args["ram_inactive"] * (1024 ** 3))
            self.reads = [int(self.cache_args["ram"] * (1024 ** 3)), int(self.cache_args["ram_inactive"] * (1024 ** 3))]
            return await super().execute_async(prompt, prompt_id, extra_data, execute_outputs)
    return PromptExecutor04x


def executor_0364(execution):
    """0.3.75's PromptExecutor with 0.3.64's constructor (0.3.64 execution.py:
    def __init__(self, server, cache_type=False, cache_size=None))."""
    class PromptExecutor0364(execution.PromptExecutor):
        def __init__(self, server, cache_type=False, cache_size=None):
            super().__init__(server, cache_type=cache_type, cache_args={"lru": cache_size or 0, "ram": 0})
    return PromptExecutor0364


def tiny_prompt(steps: int = 3) -> dict:
    """Checkpoint (the runner's tiny dev loader), two prompts, a 64x64 latent, KSampler, decode, preview."""
    return {
        "1": {"class_type": "StoryKitDevTinyCheckpoint", "inputs": {"kind": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": steps, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


class _Log(_io.StringIO):
    def isatty(self):
        return False


@pytest.fixture(scope="module")
def runner(host):
    from storykit.runner import cli, execute
    cli.register_tiny_loaders(host.nodes)
    return execute


def test_main_py_reader_finds_each_hosts_cache_args(host, runner, tmp_path):
    assert runner.main_py_cache_args(Path(host.path) / "main.py") == ("lru", "ram")  # the real 0.3.75 main.py
    newer, older = tmp_path / "new.py", tmp_path / "old.py"
    newer.write_text(f"def prompt_worker(q, server_instance, asset_manager):\n    {MAIN_PY_04X}\n")
    older.write_text(f"def prompt_worker(q, server_instance):\n    {MAIN_PY_0364}\n")
    assert runner.main_py_cache_args(newer) == ("lru", "ram", "ram_inactive")
    assert runner.main_py_cache_args(older) == ()
    assert runner.main_py_cache_args(tmp_path / "missing.py") is None


def test_runner_builds_a_04x_executor_as_its_main_py_does(host, runner, tmp_path, monkeypatch):
    """The old runner passed {"lru": 0, "ram": 0}: 0.4x's execute_async raised KeyError: 'ram_inactive' on every
    run. Built as 0.4x's main.py builds it (with --cache-classic), the prompt runs and every output node ran."""
    monkeypatch.setattr(host.execution, "PromptExecutor", executor_04x(host.execution))
    main_py = tmp_path / "main.py"
    main_py.write_text(f"def prompt_worker(q, server_instance, asset_manager):\n    {MAIN_PY_04X}\n")
    server = runner._TerminalServer({})
    ex = runner.make_executor(host.execution, server, main_py)
    assert ex.cache_args == {"lru": 0, "ram": 0, "ram_inactive": 0} and ex.asset_manager is None
    assert ex.cache_type == host.execution.CacheType.CLASSIC
    log = _Log()
    result = runner.run_prompt(host, tiny_prompt(), stream=log)
    assert {"5", "7"} <= result.ran and result.outputs["7"]["images"]


def test_runner_builds_a_0364_executor(host, runner, monkeypatch):
    monkeypatch.setattr(host.execution, "PromptExecutor", executor_0364(host.execution))
    result = runner.run_prompt(host, tiny_prompt(steps=1), quiet=True)
    assert {"5", "7"} <= result.ran


def test_progress_goes_through_the_hosts_progress_registry(host, runner):
    """KSampler's ProgressBar -> the runner's hook (main.py's hijack_progress) -> comfy_execution.progress registry
    -> the executor's WebUIProgressHandler -> "progress_state" -> the terminal line, on the real 0.3.75 executor."""
    import comfy.utils
    hook = comfy.utils.PROGRESS_BAR_HOOK
    seen = []

    class Recording(runner._TerminalServer):
        def send_sync(self, event, data, sid=None):
            seen.append(event)
            super().send_sync(event, data, sid)

    log = _Log()
    original = runner._TerminalServer
    runner._TerminalServer = Recording
    try:
        runner.run_prompt(host, tiny_prompt(steps=3), stream=log)
    finally:
        runner._TerminalServer = original
    assert "progress_state" in seen and "progress" not in seen
    lines = log.getvalue().splitlines()
    assert any(line.startswith("[5] KSampler |") and line.endswith("| 3/3") for line in lines), lines
    assert comfy.utils.PROGRESS_BAR_HOOK is hook  # the runner puts the previous hook back


def test_terminal_draws_0_4x_progress_state_with_activity(runner):
    """0.4x's WebUIProgressHandler adds "activity" and sends every started node each time; the finished and the
    just-started (0 of 1) ones draw nothing."""
    from comfy_api import feature_flags
    log = _Log()
    server = runner._TerminalServer({"5": {"class_type": "KSampler"}}, stream=log)
    server.client_id = "storykit-runner"
    # the read WebUIProgressHandler makes before sending a preview (0.3.75 and 0.4x alike)
    assert feature_flags.supports_feature(server.sockets_metadata, server.client_id, "supports_preview_metadata") is False
    nodes = {"3": {"value": 1, "max": 1, "state": "finished", "node_id": "3", "display_node_id": "3"},
             "5": {"value": 0, "max": 1, "state": "running", "node_id": "5", "display_node_id": "5"}}
    server.send_sync("progress_state", {"prompt_id": "p", "nodes": nodes}, server.client_id)
    assert log.getvalue() == ""
    nodes["5"].update(value=2, max=4, activity="loading")
    server.send_sync("progress_state", {"prompt_id": "p", "nodes": nodes}, server.client_id)
    server.send_sync("progress_state", {"prompt_id": "p", "nodes": nodes}, server.client_id)  # unchanged: no line
    assert log.getvalue().splitlines() == ["[5] KSampler |###############...............| 2/4"]


# ---------------------------------------------------------------------------------------------- pinned V3 API
def test_nodes_use_the_pinned_versioned_api(host):
    import comfy_api.v0_0_2
    pack = sys.modules[host.pack_module]
    v3 = sys.modules[f"{host.pack_module}.nodes.v3"]
    assert v3.API_MODULE == "comfy_api.v0_0_2"
    assert v3.io is comfy_api.v0_0_2.io and v3.ComfyExtension is comfy_api.v0_0_2.ComfyExtension
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, comfy_api.v0_0_2.ComfyExtension)
    node_dir = Path(v3.__file__).parent
    for path in sorted(node_dir.glob("*.py")):
        text = path.read_text()
        assert "comfy_api.latest" not in text or path.name == "v3.py", f"{path.name} imports comfy_api.latest"


# ---------------------------------------------------------------------------------------------- process isolation
@pytest.mark.parametrize("how", ["flag", "child"])
def test_process_isolation_stops_the_pack_with_the_reason(host, monkeypatch, how):
    from comfy.cli_args import args
    pack = sys.modules[host.pack_module]
    if how == "flag":
        monkeypatch.setattr(args, "use_process_isolation", True, raising=False)
    else:
        monkeypatch.setenv("PYISOLATE_CHILD", "1")
    with pytest.raises(RuntimeError, match="without --use-process-isolation") as err:
        asyncio.run(pack.comfy_entrypoint())
    assert "self-attention" in str(err.value)
    assert ("--use-process-isolation" if how == "flag" else "PYISOLATE_CHILD") in str(err.value)


# ---------------------------------------------------------------------------------------------- dynamic VRAM
def dynamic_patcher_class():
    import comfy.model_patcher

    class DynamicVRAMPatcher(comfy.model_patcher.ModelPatcher):
        """The contract of 0.4x's ModelPatcherDynamic (comfy/model_patcher.py) that training meets, on 0.3.75's class."""

        def is_dynamic(self):  # ModelPatcherDynamic.is_dynamic
            return True

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            # ModelPatcherDynamic.load: "assert not force_patch_weights", "assert not full_load",
            # "assert device_to == self.load_device"
            assert not force_patch_weights
            assert not full_load
            assert device_to == self.load_device
            self.dynamic_loads = getattr(self, "dynamic_loads", 0) + 1
            return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load)

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            # ModelPatcherDynamic.partially_load: unpatch_model(..., unpatch_weights=False), patch_model(load_weights=
            # False), then self.load(device_to, dirty=dirty): never a full load, whatever memory there is
            assert not force_patch_weights
            self.unpatch_model(self.offload_device, unpatch_weights=False)
            self.patch_model(load_weights=False)
            self.load(device_to)

        def clone(self, disable_dynamic=False):
            # ModelPatcher.clone(disable_dynamic=True) on a dynamic patcher: class ModelPatcher, the model from
            # cached_patcher_init[0](*cached_patcher_init[1], disable_dynamic=True), RuntimeError without one
            n = super().clone()
            if disable_dynamic:
                if getattr(self, "cached_patcher_init", None) is None:
                    raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
                fresh = self.cached_patcher_init[0](*self.cached_patcher_init[1], disable_dynamic=True)
                n.__class__ = comfy.model_patcher.ModelPatcher
                n.model = fresh.model
                n.backup, n.object_patches_backup, n.hook_backup = {}, {}, {}
            return n
    return DynamicVRAMPatcher


def pictures(n: int) -> torch.Tensor:
    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(n))


def dynamic_model(seed: int, with_init: bool = True):
    from storykit.runner import testmodels
    plain = testmodels.build_unet("sd15", seed)
    dyn = dynamic_patcher_class()(plain.model, plain.load_device, plain.offload_device)
    dyn.cached_patcher_init = ((lambda disable_dynamic=False: testmodels.build_unet("sd15", seed)), ()) if with_init \
        else None
    return dyn


@pytest.fixture(scope="module")
def trainers(host):
    return sys.modules[host.nodes.NODE_CLASS_MAPPINGS["StoryKitTrainDreamBooth"].__module__]


def test_the_contract_patcher_refuses_a_full_load(host):
    dyn = dynamic_model(7)
    with pytest.raises(AssertionError):
        dyn.load(dyn.load_device, full_load=True)


@pytest.mark.parametrize("mode", ["LoRA", "full fine-tune"])
def test_dreambooth_trains_a_plain_copy_under_dynamic_vram(host, tiny_sd15, trainers, mode):
    _, clip, vae = tiny_sd15
    dyn = dynamic_model(7)
    before = {k: v.detach().clone() for k, v in dyn.model.state_dict().items()}
    with torch.inference_mode():
        out_model, _, path, history = trainers.train_dreambooth(
            dyn, clip, vae, pictures(3), identifier="sks", class_noun="person", prior_preservation=False,
            prior_weight=1.0, class_latents=None, mode=mode, rank=2, alpha=2.0, train_text_encoder=False,
            learning_rate=1e-2, text_encoder_lr=1e-4, steps=2, batch_size=1, resolution=64,
            gradient_checkpointing=False, seed=0, name=f"db_dynamic_{mode[0]}", flips=False)
    assert path.is_file() and len(history["loss"]) == 2
    assert getattr(dyn, "dynamic_loads", 0) == 0  # never loaded for training: a plain copy was
    assert out_model.is_dynamic() and out_model.model is dyn.model  # the graph keeps its own (dynamic) MODEL
    patches = [t for entries in out_model.patches.values() for p in entries for t in _tensors(p)]
    assert patches and all(t.device.type == "cpu" for t in patches)
    assert all(torch.equal(v, dyn.model.state_dict()[k]) for k, v in before.items())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif hasattr(obj, "weights"):  # comfy.weight_adapter LoRA adapters keep their tensors in .weights
        yield from _tensors(obj.weights)


def test_dynamic_model_without_a_loader_copy_gets_a_clear_error(host, tiny_sd15, trainers):
    _, clip, vae = tiny_sd15
    with torch.inference_mode(), pytest.raises(ValueError, match="--disable-dynamic-vram"):
        trainers.train_dreambooth(
            dynamic_model(8, with_init=False), clip, vae, pictures(1), identifier="sks", class_noun="person",
            prior_preservation=False, prior_weight=1.0, class_latents=None, mode="LoRA", rank=2, alpha=2.0,
            train_text_encoder=False, learning_rate=1e-2, text_encoder_lr=1e-4, steps=1, batch_size=1,
            resolution=64, gradient_checkpointing=False, seed=0, name="db_dynamic_err", flips=False)


def dynamic_clip(seed: int):
    """A CLIP whose patcher keeps the dynamic contract, with 0.4x's CLIP.clone(disable_dynamic=...) (comfy/sd.py:
    `n.patcher = self.patcher.clone(disable_dynamic=disable_dynamic)`, the text encoder module left as it was)."""
    import comfy.sd
    from storykit.runner import testmodels

    class DynamicCLIP(comfy.sd.CLIP):
        def clone(self, disable_dynamic=False):
            n = super().clone()
            n.__class__ = DynamicCLIP
            n.patcher = self.patcher.clone(disable_dynamic=disable_dynamic)
            return n

    clip = testmodels.build_clip("sd15", seed)
    clip.__class__ = DynamicCLIP
    patcher = clip.patcher.clone()
    patcher.__class__ = dynamic_patcher_class()
    patcher.cached_patcher_init = ((lambda disable_dynamic=False: testmodels.build_clip("sd15", seed).patcher), ())
    clip.patcher = patcher
    return clip


def test_textual_inversion_trains_through_a_plain_text_encoder_copy(host, tiny_sd15, trainers):
    model, _, vae = tiny_sd15
    clip = dynamic_clip(9)
    before = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    with torch.inference_mode():
        path, rows, history = trainers.train_textual_inversion(
            model, clip, vae, pictures(2), token="ti_dynamic", initializer_word="person", vectors=1, steps=2,
            learning_rate=1e-2, batch_size=1, resolution=64, templates=trainers.OBJECT_TEMPLATES[:2], seed=0)
    assert path.is_file() and len(history["loss"]) == 2
    assert all(torch.isfinite(r).all() for r in rows.values())
    assert getattr(clip.patcher, "dynamic_loads", 0) == 0  # the dynamic text encoder was never loaded to train
    assert all(torch.equal(v, clip.cond_stage_model.state_dict()[k]) for k, v in before.items())
