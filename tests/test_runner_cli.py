"""The headless runner as a user meets it: exit codes, saved files, and errors that say what to do."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storykit.runner import cli
from storykit.runner.host import PACK_DIR

@pytest.fixture(autouse=True)
def _restore_host_folders(host):
    """cli.main(--output/--input) re-points the host's folders; give later tests the session's own back."""
    fp = host.folder_paths
    output, input_dir = fp.get_output_directory(), fp.get_input_directory()
    yield
    fp.set_output_directory(output)
    fp.set_input_directory(input_dir)


BASIC = str(PACK_DIR / "workflows" / "storykit_sd15_basic.json")
FAST = ["--set", "4.width=64", "--set", "4.height=64", "--set", "5.steps=2"]


def test_run_saves_images_and_exits_zero(host, tmp_path, capsys):
    rc = cli.main(["run", BASIC, "--tiny-model", "sd15", "--output", str(tmp_path), "--quiet",
                   "--save-api", str(tmp_path / "api.json"), *FAST])
    out = capsys.readouterr().out.split()
    assert rc == 0
    assert len(out) == 1 and Path(out[0]).is_file() and Path(out[0]).parent.parent == tmp_path
    api = json.loads((tmp_path / "api.json").read_text())
    assert api["5"]["inputs"]["steps"] == 2 and api["1"]["class_type"] == cli.TINY_LOADER


def test_only_the_runners_progress_bar_shows(host, tmp_path, capsys):
    rc = cli.main(["run", BASIC, "--tiny-model", "sd15", "--output", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert rc == 0 and "[5] KSampler |" in err and "2/2" in err
    assert "it/s" not in err and "s/it" not in err, err  # the host's tqdm bar of the same sampler


def test_repeat_applies_seed_controls(host, tmp_path, capsys):
    wf = json.loads(Path(BASIC).read_text())
    next(n for n in wf["nodes"] if n["id"] == 5)["widgets_values"][1] = "increment"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    rc = cli.main(["run", str(path), "--tiny-model", "sd15", "--output", str(tmp_path), "--quiet", "--repeat", "2",
                   *FAST])
    files = capsys.readouterr().out.split()
    assert rc == 0 and len(files) == 2
    from PIL import Image
    seeds = [json.loads(Image.open(f).info["prompt"])["5"]["inputs"]["seed"] for f in files]
    assert seeds == [42, 43]


def test_missing_model_names_the_file_and_the_fix(host, tmp_path, capsys):
    rc = cli.main(["run", BASIC, "--output", str(tmp_path), "--quiet", *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert "v1-5-pruned-emaonly-fp16.safetensors" in err and "--models" in err


def test_missing_node_type_is_reported(host, tmp_path, capsys):
    wf = json.loads(Path(BASIC).read_text())
    wf["nodes"][0]["type"] = "NotInstalledLoader"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    assert cli.main(["run", str(path), "--quiet"]) == 2
    assert "NotInstalledLoader" in capsys.readouterr().err


def test_failing_node_exits_one(host, tmp_path, capsys):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
              "2": {"class_type": "StoryKitComicLayout",
                    "inputs": {"frames": ["1", 0], "layout": "grid", "panels_per_page": 0, "page_width": 256,
                               "margin": 0, "gutter": 0, "border": 0, "caption_mode": "none", "font_size": 12,
                               "background": "not-a-colour", "ink": "black"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt))
    assert cli.main(["run", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "StoryKitComicLayout" in err and "background" in err


def test_bad_override_and_missing_file(host, capsys):
    assert cli.main(["run", BASIC, "--tiny-model", "sd15", "--set", "nonsense"]) == 2
    assert "NODE.INPUT=VALUE" in capsys.readouterr().err
    assert cli.main(["run", "/nonexistent/workflow.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """`python -m storykit` in a fresh process: argument errors and conversion without running anything."""
    import storykit
    env = dict(os.environ)
    link_dir = str(Path(storykit.__file__).parent.parent)  # the folder in which `storykit` names this checkout
    env["PYTHONPATH"] = os.pathsep.join([link_dir, env.get("PYTHONPATH", "")])
    out = tmp_path / "api.json"
    proc = subprocess.run([sys.executable, "-m", "storykit", "convert", BASIC, "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["5"]["class_type"] == "KSampler"
    proc = subprocess.run([sys.executable, "-m", "storykit"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _own_loaders(data: dict, host) -> set:
    """Loaders other than Load Checkpoint (other models, input images): workflows with those need the test models or
    input files that their own tests provide."""
    from storykit.runner import convert as conv
    prompt = conv.to_api(data, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    return {e["class_type"] for e in prompt.values()
            if ("Loader" in e["class_type"] or e["class_type"].startswith("Load"))
            and e["class_type"] not in cli.CHECKPOINT_LOADERS}


@pytest.mark.parametrize("path", sorted((PACK_DIR / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_workflow_runs_headless(host, run_workflow, path):
    """Each example validates and runs on a tiny model of its family, at a small size and few steps; an example
    that loads other models (video models, CLIP vision) must be run by a test of its own."""
    data = json.loads(path.read_text())
    from storykit.runner import convert as conv
    assert not conv.is_api_format(data), "ship workflows in the front end's format so the template browser opens them"
    if _own_loaders(data, host):
        here = Path(__file__).name
        runners = [t.name for t in Path(__file__).parent.rglob("test_*.py")
                   if t.name != here and path.name in t.read_text() and "run_workflow" in t.read_text()]
        assert runners, f"{path.name} loads {sorted(_own_loaders(data, host))}: no test runs it headless"
        return
    kind = "sdxl" if "sdxl" in path.stem else "sd15"
    prompt = conv.to_api(data, conv.host_input_specs(host.nodes.NODE_CLASS_MAPPINGS)).prompt
    overrides = []
    for node_id, entry in prompt.items():
        for name, value in entry["inputs"].items():
            if name in ("width", "height") and isinstance(value, int) and value > 64:
                overrides.append(f"{node_id}.{name}=64")
            if name == "steps" and isinstance(value, int) and value > 2 and entry["class_type"] in SAMPLERS:
                overrides.append(f"{node_id}.{name}=2")
    result = run_workflow(data, tiny_model=kind, overrides=overrides)
    assert result.ran


SAMPLERS = {"KSampler", "KSamplerAdvanced", "BasicScheduler", "StoryKitStorySampler"}


def test_demo_runs_the_story_workflow(host, tmp_path, capsys):
    """The README's main command, on the tiny model: the shipped story workflow end to end, quick settings."""
    rc = cli.main(["demo", "--tiny-model", "sd15", "--output", str(tmp_path), "--quiet", "--quick"])
    files = capsys.readouterr().out.split()
    assert rc == 0 and files and all(Path(f).is_file() for f in files)
    assert all(Path(f).name.startswith(cli.DEMO_WORKFLOW) for f in files)


def test_quick_settings_shrink_sizes_and_steps():
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 128, "batch_size": 1}},
              "2": {"class_type": "KSampler", "inputs": {"steps": 30, "seed": 1}},
              "3": {"class_type": "StoryKitTrainDreamBooth",
                    "inputs": {"steps": 400, "resolution": 512, "num_class_images": 100, "class_sample_steps": 25}},
              "4": {"class_type": "BasicScheduler", "inputs": {"steps": 20, "scheduler": "normal", "denoise": 1.0}},
              "5": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["4", 0], "step": 15}},
              "6": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 40, "start_at_step": 0, "end_at_step": 30}},
              "7": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 40, "start_at_step": 30, "end_at_step": 10000}},
              "8": {"class_type": "StoryKitTrainTextualInversion", "inputs": {"steps": 1500, "resolution": 512}},
              "9": {"class_type": "StoryKitStorySampler", "inputs": {"steps": ["10", 0]}},
              "10": {"class_type": "SaveLoRA", "inputs": {"steps": 400}}}
    cli.quick_settings(prompt)
    assert prompt["1"]["inputs"] == {"width": 256, "height": 128, "batch_size": 1}
    assert prompt["2"]["inputs"]["steps"] == 4 and prompt["4"]["inputs"]["steps"] == 4
    assert prompt["3"]["inputs"] == {"steps": 4, "resolution": 256, "num_class_images": 2, "class_sample_steps": 4}
    assert prompt["8"]["inputs"] == {"steps": 4, "resolution": 256}
    assert prompt["5"]["inputs"]["step"] == 3  # 15 of 20 -> 3 of 4: the split stays three quarters in
    # A base/refiner pair keeps meeting at the same step, and the refiner still runs to the end.
    assert [prompt[n]["inputs"]["start_at_step"] for n in "67"] == [0, 3]
    assert [prompt[n]["inputs"]["end_at_step"] for n in "67"] == [3, 10000]
    assert prompt["9"]["inputs"]["steps"] == ["10", 0] and prompt["10"]["inputs"]["steps"] == 400


CSA = str(PACK_DIR / "workflows" / "storykit_csa_sd15.json")


@pytest.mark.parametrize("override,node,name", [("2.sampling_rate=1.5", "2", "sampling_rate"),
                                                ("5.steps=0", "5", "steps"), ("5.seed=-1", "5", "seed"),
                                                (f"5.seed={2**64 + 1}", "5", "seed")])
def test_invalid_input_exits_two_naming_node_and_input(host, tmp_path, capsys, override, node, name):
    """The host drops an output whose inputs are invalid and still runs the others (here the Captions preview):
    that is a workflow that cannot run as asked, not a success."""
    rc = cli.main(["run", CSA, "--tiny-model", "sd15", "--quick", "--output", str(tmp_path), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "finished" not in err
    assert f"node {node} (" in err and name in err and "--set" in err
    assert not list(tmp_path.rglob("*.png"))


def test_ckpt_that_is_not_a_model_file_says_so(host, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    before = list(host.folder_paths.get_folder_paths("checkpoints"))
    assert cli.main(["run", BASIC, "--ckpt", str(notes), "--quiet"]) == 2
    assert "not a model file" in capsys.readouterr().err
    assert host.folder_paths.get_folder_paths("checkpoints") == before


def test_models_dir_covers_every_folder_the_pack_registers(host, tmp_path):
    from storykit.runner import host as host_mod
    pack = {name for name in host.folder_paths.folder_names_and_paths if name.startswith("storykit")}
    assert "storykit_predictors" in pack
    host_mod.add_models_dir(host.folder_paths, tmp_path)
    try:
        for name in pack:
            assert host.folder_paths.get_folder_paths(name)[0] == str(tmp_path / name), name
        assert host.folder_paths.folder_names_and_paths["storykit_predictors"][1] >= {".safetensors"}
    finally:  # give later tests the session's folders back
        for name in set(host_mod.MODEL_FOLDERS) | pack:
            paths = host.folder_paths.folder_names_and_paths.get(host.folder_paths.map_legacy(name), ([],))[0]
            if str(tmp_path / name) in paths:
                paths.remove(str(tmp_path / name))


def test_a_damaged_embedding_or_lora_fails_the_run(host, tmp_path, capsys):
    """The host only logs these (shown with --verbose) and goes on with the file ignored: the runner says so and
    exits 1, naming the node and the file."""
    emb = host.base / "models" / "embeddings" / "damaged_emb.safetensors"
    emb.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" + b"\x00" * 64)
    rc = cli.main(["run", BASIC, "--tiny-model", "sd15", "--output", str(tmp_path), "--quiet", *FAST,
                   "--set", "2.text=a photo of embedding:damaged_emb"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "node 2 (CLIPTextEncode)" in err and "damaged_emb" in err
    rc = cli.main(["run", BASIC, "--tiny-model", "sd15", "--output", str(tmp_path), "--quiet", *FAST,
                   "--set", "2.text=a photo of embedding:no_such_embedding"])
    err = capsys.readouterr().err
    assert rc == 1 and "no_such_embedding" in err


@pytest.mark.parametrize("signum,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_during_headless_training_saves_the_step_and_says_how_to_resume(host, tmp_path, signum, code):
    """The first Ctrl-C (or SIGTERM) acts like Cancel: the step ends, is saved, the run exits 130 (143)."""
    import signal
    import time

    import storykit
    models = tmp_path / "models"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "any.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x3366CC}},
        "3": {"class_type": "StoryKitTrainTextualInversion",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
                         "token_name": "sig_hero", "initializer_word": "person", "vectors_per_token": 1,
                         "steps": 400, "learning_rate": 5e-3, "batch_size": 1, "resolution": 64,
                         "templates": "object", "custom_templates": "", "seed": 0, "save_every": 1}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(prompt))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(storykit.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "storykit", "run", str(path), "--tiny-model", "sd15",
                             "--models", str(models), "--output", str(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = models / "embeddings" / "storykit_checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(folder.glob("sig_hero_s*.safetensors")):
        time.sleep(0.2)  # save_every=1: the first checkpoint says training is under way; now press Ctrl-C
    proc.send_signal(getattr(signal, signum))
    lines = []
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within 120 s of the signal:\n" + "".join(lines))
    err = "".join(lines) + err
    saved = sorted(folder.glob("sig_hero_s*.safetensors"))
    assert proc.returncode == code, err[-3000:]
    assert f"stopped by {signum}" in err and f"saved {saved[-1]}; resume with" in err, err[-3000:]
    assert f"--set 3.resume_from={saved[-1].name}" in err and len(saved) < 400
    assert not list(models.glob("embeddings/sig_hero*.safetensors"))  # no final file: the run did not finish



@pytest.mark.parametrize("name", ["storykit_1p1s_sdxl", "storykit_train_ti", "storykit_train_dreambooth",
                                  "storykit_transitions_wan", "storykit_csa_sdxl"])
def test_quick_caps_every_step_count_of_the_shipped_workflows(host, tmp_path, name):
    """`run --quick --save-api`: no steps input of the prompt that ran is above 4 (the run itself stops at validation:
    the models are not there)."""
    api = tmp_path / "api.json"
    cli.main(["run", str(PACK_DIR / "workflows" / f"{name}.json"), "--quick", "--quiet", "--save-api", str(api)])
    prompt = json.loads(api.read_text())
    counts = {(nid, k): v for nid, e in prompt.items() for k, v in e["inputs"].items()
              if k in ("steps", "class_sample_steps") and isinstance(v, int)}
    assert counts and max(counts.values()) <= 4, counts
