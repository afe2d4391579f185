"""`storykit batch`: four stories on the tiny SD1.5 model, in this process and on a local Ray cluster of 2 actors;
the same pictures byte for byte, an actor killed mid-batch loses nothing finished, --resume runs only what is
missing, and bad input fails clearly (one malformed story fails alone with the Story Prompt's own message)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from storykit.runner import batch, cli
from storykit.runner import convert as conv
from storykit.runner.host import PACK_DIR

WORKFLOW = PACK_DIR / "workflows" / "storykit_csa_sd15.json"
SMALL = ["4.width=64", "4.height=64", "5.steps=1", "9.page_width=256", "9.font_size=10"]
STORIES = [
    {"id": "mia", "story": "[Mia] a woman with short red hair\n[Mia] reads a letter # Morning.\n[Mia] runs", "seed": 1},
    {"id": "series+/otto", "story": "[Otto] an old man with a beard\n[Otto] feeds pigeons\n[Otto] sleeps", "seed": 2},
    {"id": "broken", "story": "[Mia] a woman\n[Mia] waves\n[Bob] eats soup # Bob has no character line."},
    {"id": "fox", "identity_prompt": "a fox in a red scarf", "frame_prompts": ["jumps", "hides"], "seed": 3},
    {"id": "lena", "story": "[Lena] a girl in a green coat\n[Lena] climbs a hill\n[Lena] looks at the sea",
     "set": {"5.cfg": 3.0}},
]
DONE = {"mia", "series+/otto", "fox", "lena"}
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install 'storykit[ray]' to run the Ray batch tests")


def config() -> dict:
    return {"workflow": conv.load_workflow_file(WORKFLOW), "workflow_name": WORKFLOW.name, "tiny_model": "sd15",
            "quick": True, "overrides": SMALL}


def manifest(folder: Path) -> dict[str, dict]:
    lines = (folder / batch.MANIFEST).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["story_id"] for r in records}) == len(records), "one line per story"
    return {r["story_id"]: r for r in records}


def pictures(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def forget(folder: Path, ids: set[str]) -> None:
    """As if the batch had stopped before these stories: their lines and folders gone."""
    kept = [line for line in (folder / batch.MANIFEST).read_text().splitlines()
            if json.loads(line)["story_id"] not in ids]
    (folder / batch.MANIFEST).write_text("".join(line + "\n" for line in kept))
    for story_id in ids:
        shutil.rmtree(folder / story_id, ignore_errors=True)


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stories") / "stories.json"
    path.write_text(json.dumps(STORIES))
    return path


@pytest.fixture(scope="module")
def local_batch(host, stories_file, tmp_path_factory) -> Path:
    """The batch through the command line, in this process."""
    out = tmp_path_factory.mktemp("local") / "batch"
    argv = ["batch", str(stories_file), "--workflow", str(WORKFLOW), "--tiny-model", "sd15", "--quick", "--quiet",
            "--output", str(out)] + [a for s in SMALL for a in ("--set", s)]
    output = host.folder_paths.get_output_directory()
    assert cli.main(argv) == 1  # one story failed
    assert host.folder_paths.get_output_directory() == output  # the session's own output folder is left as it was
    return out


def test_local_batch_writes_a_folder_and_a_manifest_line_per_story(local_batch):
    records = manifest(local_batch)
    assert {k for k, r in records.items() if r["status"] == "done"} == DONE
    broken = records["broken"]
    assert broken["status"] == "failed" and broken["files"] == []
    assert "line 3" in broken["error"] and "[Bob], who has no character line" in broken["error"]
    hashes = {r["workflow_hash"] for r in records.values()}
    assert len(hashes) == 1
    for story_id in DONE:
        record = records[story_id]
        assert record["files"] and all((local_batch / f).is_file() and f.startswith(f"{story_id}/")
                                       for f in record["files"])
        assert len(record["prompts"]) == len(record["files"]) and record["seconds"] > 0 and record["error"] is None
    mia = records["mia"]
    assert mia["seeds"] == [1, 1]  # the story's seed in the CSA and sampler seeds; the tiny loader's seed untouched
    assert mia["prompts"][:2] == [p for p in mia["prompts"] if p] and "short red hair reads a letter" in mia["prompts"][0]
    assert mia["prompts"][2] is None  # the comic page shows every frame
    assert records["fox"]["prompts"][0].endswith("a fox in a red scarf jumps, soft watercolour, gentle colours")
    assert "5.cfg=3.0" in records["lena"]["settings"]["set"]
    from PIL import Image
    assert json.loads(Image.open(local_batch / records["lena"]["files"][0]).info["prompt"])["5"]["inputs"]["cfg"] == 3.0


def test_local_resume_runs_only_what_is_missing(host, local_batch, stories_file, tmp_path):
    out = tmp_path / "batch"
    shutil.copytree(local_batch, out)
    before = pictures(out)
    forget(out, {"series+/otto", "lena"})
    started = []
    records = batch.run_batch(batch.load_stories(stories_file), config(), out, resume=True, quiet=True,
                              on_event=lambda kind, story_id, *_: kind == "story_started" and started.append(story_id))
    assert sorted(started) == ["broken", "lena", "series+/otto"]  # the failed story runs again; done ones do not
    assert {r["story_id"] for r in records} == {"broken", "lena", "series+/otto"}
    assert {k for k, r in manifest(out).items() if r["status"] == "done"} == DONE
    assert pictures(out) == before


def test_models_load_once_and_a_repeated_story_still_saves(host, monkeypatch):
    """One executor for the batch: the loader runs for the first story only, and a second story identical to the
    first (another id) is not served from the cache without its pictures."""
    from PIL import Image
    job = batch.Job(config())
    loader = host.nodes.NODE_CLASS_MAPPINGS[cli.TINY_LOADER]
    calls = []
    real = loader.execute.__func__
    monkeypatch.setattr(loader, "execute", classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    first, again = (job.run(batch.Story(name, STORIES[0]["story"], seed=1)) for name in ("first", "again"))
    assert first["record"]["status"] == again["record"]["status"] == "done" and len(calls) == 1
    assert len(first["files"]) == len(again["files"]) == 3
    import io
    for name, data in first["files"].items():
        pixels = [Image.open(io.BytesIO(d)).tobytes() for d in (data, again["files"][name])]
        assert pixels[0] == pixels[1], name


def test_a_folder_holding_a_batch_is_never_overwritten(local_batch, stories_file, capsys):
    text = (local_batch / batch.MANIFEST).read_text()
    rc = cli.main(["batch", str(stories_file), "--workflow", str(WORKFLOW), "--output", str(local_batch)])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    assert (local_batch / batch.MANIFEST).read_text() == text


def test_a_workflow_with_nothing_to_fill_names_the_node_types(host, stories_file, tmp_path, capsys):
    start = time.perf_counter()
    rc = cli.main(["batch", str(stories_file), "--workflow", str(PACK_DIR / "workflows" / "storykit_sd15_basic.json"),
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and batch.STORY_PROMPT in err and batch.ONE_PROMPT in err
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()


def test_bad_stories_files(tmp_path, capsys):
    cases = {"dup.json": ([{"id": "a", "story": "x"}, {"id": "a", "story": "y"}], "appears twice"),
             "slash.json": ([{"id": "../a", "story": "x"}], "folder name"),
             "both.json": ([{"id": "a"}], "give 'story'"),
             "typo.json": ([{"id": "a", "story": "x", "seeds": 3}], "unknown field")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
        assert cli.main(["batch", str(tmp_path / name), "--workflow", str(WORKFLOW)]) == 2
        assert message in capsys.readouterr().err, name
    (tmp_path / "stories").mkdir()
    (tmp_path / "stories" / "first.txt").write_text("[A] a cat\n[A] sleeps")
    (tmp_path / "list.yaml").write_text("- id: one\n  story: |\n    [A] a cat\n    [A] sleeps\n  seed: 5\n")
    assert [s.id for s in batch.load_stories(tmp_path / "stories")] == ["first"]
    (story,) = batch.load_stories(tmp_path / "list.yaml")
    assert story.seed == 5 and story.story == "[A] a cat\n[A] sleeps\n"


@needs_ray
def test_unreachable_ray_address_fails_within_seconds(stories_file, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    rc = cli.main(["batch", str(stories_file), "--workflow", str(WORKFLOW), "--address", f"127.0.0.1:{port}",
                   "--output", str(tmp_path / "out")])
    assert rc == 2 and f"127.0.0.1:{port}" in capsys.readouterr().err
    assert time.perf_counter() - start < 10


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_batch_survives_a_killed_actor_and_matches_the_local_pictures(ray_cluster, local_batch, stories_file,
                                                                          tmp_path):
    out = tmp_path / "batch"
    events = []

    def on_event(kind, *info):
        events.append((kind, *info))
        started = [e for e in events if e[0] == "story_started"]
        if kind == "story_started" and len(started) == 3:
            os.kill(info[1], signal.SIGKILL)  # the actor that just took the third story dies mid-story

    records = batch.run_batch(batch.load_stories(stories_file), config(), out, use_ray=True, actors=2, quiet=True,
                              on_event=on_event)
    killed = [e for e in events if e[0] == "story_started"][2][1]
    assert [e[0] for e in events].count("actor_died") == 1
    finished_before = [e[1] for e in events[:events.index(next(e for e in events if e[0] == "actor_died"))]
                       if e[0] == "story_finished"]
    starts = [e[1] for e in events if e[0] == "story_started"]
    assert starts.count(killed) == 2 and all(starts.count(s) == 1 for s in finished_before)  # only its story reran
    assert len(records) == len(STORIES)
    done = {k for k, r in manifest(out).items() if r["status"] == "done"}
    assert done == DONE and "line 3" in manifest(out)["broken"]["error"]
    assert pictures(out) == pictures(local_batch)  # same seeds, same bytes, on either path
    assert {r["workflow_hash"] for r in manifest(out).values()} == {r["workflow_hash"]
                                                                     for r in manifest(local_batch).values()}

    forget(out, {"mia", "fox"})
    started = []
    records = batch.run_batch(batch.load_stories(stories_file), config(), out, use_ray=True, actors=1, resume=True,
                              quiet=True, on_event=lambda kind, sid, *_: kind == "story_started" and started.append(sid))
    assert sorted(started) == ["broken", "fox", "mia"]
    assert pictures(out) == pictures(local_batch)
