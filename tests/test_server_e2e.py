"""End to end: the real ComfyUI server (main.py --cpu) with the pack in custom_nodes, a shipped workflow submitted
over HTTP, the saved image checked on disk. Uses the full-size random-weight SD1.5 checkpoint through the stock
CheckpointLoaderSimple."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from storykit.runner import convert as conv
from storykit.runner.host import PACK_DIR, comfyui_path

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def _post(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_sd15_checkpoint):
    base = tmp_path_factory.mktemp("server")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / random_sd15_checkpoint.name).symlink_to(random_sd15_checkpoint)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "storykit").symlink_to(PACK_DIR, target_is_directory=True)
    port = _free_port()
    log = open(base / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
        cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            _get(url + "/system_stats", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("server did not start:\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_pack_nodes_and_workflows_are_served(server):
    url, base = server
    info = _get(url + "/object_info", timeout=60)
    ours = {k: v for k, v in info.items() if k.startswith("StoryKit")}
    assert ours, "the server registered no StoryKit node"
    for key, node in ours.items():
        assert node["category"].startswith("StoryKit"), key
        assert node["python_module"].startswith("custom_nodes."), key
    templates = _get(url + "/workflow_templates")
    shipped = sorted(p.stem for p in (PACK_DIR / "workflows").glob("*.json"))
    assert sorted(templates.get("storykit", [])) == shipped
    log = (base / "server.log").read_text()
    assert not [line for line in log.splitlines() if "Cannot import" in line and str(base / "custom_nodes") in line]
    assert f"{base / 'custom_nodes' / 'storykit'}" in log  # listed among the custom nodes it imported, log[-2000:]


def test_front_end_extension_and_its_route_are_served(server):
    url, _ = server
    scripts = _get(url + "/extensions")
    assert "/extensions/storykit/story_prompt.js" in scripts
    with urllib.request.urlopen(url + "/extensions/storykit/story_prompt.js", timeout=10) as r:  # noqa: S310
        assert b"StoryKitStoryPrompt" in r.read()
    ok = _post(url + "/storykit/story/preview", {"story": "[Ann] a girl\n[Ann] waves # Hi.",
                                                 "references_per_character": 1})
    assert ok["ok"] and ok["frames"][0]["caption"] == "Hi."
    bad = _post(url + "/storykit/story/preview", {"story": "[Ann] a girl\n[Ann] waves\n[Bob] runs"})
    assert not bad["ok"] and "[Bob]" in bad["error"]


def test_shipped_workflow_runs_over_http(server, random_sd15_checkpoint):
    url, base = server
    workflow = json.loads((PACK_DIR / "workflows" / "storykit_sd15_basic.json").read_text())
    # Convert with the node definitions the server itself publishes, as the front end does.
    specs = conv.object_info_input_specs(_get(url + "/object_info", timeout=60))
    prompt = conv.to_api(workflow, specs).prompt
    conv.apply_overrides(prompt, [f"1.ckpt_name={random_sd15_checkpoint.name}", "4.width=64", "4.height=64",
                                  "5.steps=1", "7.filename_prefix=e2e"])
    client = str(uuid.uuid4())
    reply = _post(url + "/prompt", {"prompt": prompt, "client_id": client,
                                    "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert not reply.get("node_errors"), reply
    prompt_id = reply["prompt_id"]
    deadline = time.time() + 600
    while True:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history:
            break
        assert time.time() < deadline, "the prompt did not finish in 10 minutes"
        time.sleep(1)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    saved = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    from PIL import Image
    with Image.open(saved) as img:
        assert img.size == (64, 64)
        assert json.loads(img.info["prompt"])["5"]["inputs"]["steps"] == 1
    # The PNG carries the workflow, and the runner reads it back.
    assert conv.load_workflow_file(saved)["nodes"]


def test_checkpoint_detected_as_sd15(host, random_sd15_checkpoint):
    import comfy.sd
    import comfy.supported_models
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(random_sd15_checkpoint), output_vae=True, output_clip=True,
        embedding_directory=host.folder_paths.get_folder_paths("embeddings"))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert clip.tokenizer.clip_l.embedding_size == 768 if hasattr(clip.tokenizer, "clip_l") else True
    assert vae.latent_channels == 4
