"""`python -m storykit batch`: many stories through one workflow, in this process or on Ray actors, resumable.

Each story fills the workflow's Story Prompt (or One-Prompt-One-Story encoder), its seeds and its own --set values,
runs headless as `run` does, and lands in OUT/<story id>/ with one JSON line in OUT/manifest.jsonl. Both paths run
the same `Job.run` (the host booted once, models kept loaded between stories); on Ray one actor per GPU (or CPU
actors on a CPU machine) pulls stories from a queue, and the driver writes the pictures it gets back, so the
workers need no shared disk.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..kernels import story_plan
from ..kernels.safefiles import atomic_write_bytes
from . import convert as conv

log = logging.getLogger("storykit.runner")

MANIFEST = "manifest.jsonl"
STORY_PROMPT = "StoryKitStoryPrompt"
ONE_PROMPT = "StoryKitOnePromptStoryEncode"
TARGET_TYPES = f"{STORY_PROMPT} (Story Prompt) or {ONE_PROMPT} (One-Prompt-One-Story encoder)"
SEED_INPUTS = ("seed", "noise_seed")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._+-]{0,127})*$")
RAY_HINT = "pip install 'storykit[ray]' (or pip install -r requirements-ray.txt)"


class BatchError(conv.WorkflowError):
    pass


# ---------------------------------------------------------------------------------------------- stories
@dataclass
class Story:
    id: str
    story: str | None = None
    seed: int | None = None
    set: dict = field(default_factory=dict)
    identity_prompt: str | None = None
    frame_prompts: list[str] | None = None


def load_stories(path: str | os.PathLike) -> list[Story]:
    """A YAML/JSON list of {id, story | identity_prompt + frame_prompts, seed?, set?}, or a folder of .txt files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise BatchError(f"{path}: no .txt files (one story each, in the Story Prompt's syntax)")
        return _unique([Story(f.stem, story=f.read_text(encoding="utf-8")) for f in files], path)
    if not path.is_file():
        raise BatchError(f"stories file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise their own types; both mean the same to the user
        raise BatchError(f"{path} does not parse: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("stories"), list):
        data = data["stories"]
    if not isinstance(data, list) or not data:
        raise BatchError(f"{path}: expected a list of stories, each {{id: ..., story: ...}}")
    return _unique([_story(entry, f"{path.name}: entry {n + 1}") for n, entry in enumerate(data)], path)


def _story(entry, where: str) -> Story:
    if not isinstance(entry, dict):
        raise BatchError(f"{where}: expected a mapping with 'id' and 'story', got {type(entry).__name__}")
    unknown = set(entry) - {"id", "story", "seed", "set", "identity_prompt", "frame_prompts"}
    if unknown:
        raise BatchError(f"{where}: unknown field(s) {sorted(unknown)}; a story has id, story, seed, set, "
                         "identity_prompt, frame_prompts")
    story_id = str(entry.get("id", ""))
    if not SAFE_ID.match(story_id):
        raise BatchError(f"{where}: id {story_id!r} must be a folder name (or folders joined by '/'): letters, "
                         "digits, '.', '_', '+', '-'")
    frames = entry.get("frame_prompts")
    if isinstance(frames, str):
        frames = [line for line in frames.splitlines() if line.strip()]
    has_story, has_1p = entry.get("story") is not None, entry.get("identity_prompt") is not None
    if not (has_story or has_1p) or (has_1p and not frames):
        raise BatchError(f"{where} ({story_id}): give 'story' (Story Prompt syntax) or 'identity_prompt' and "
                         "'frame_prompts' (or both: each fills the nodes it fits)")
    seed = entry.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BatchError(f"{where} ({story_id}): seed must be a whole number >= 0, not {seed!r}")
    overrides = entry.get("set") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and "." in k for k in overrides):
        raise BatchError(f"{where} ({story_id}): set must map 'NODE.INPUT' to a value, e.g. {{'5.steps': 30}}")
    return Story(story_id, entry.get("story"), seed, dict(overrides), entry.get("identity_prompt"),
                 [str(f) for f in frames] if frames else None)


def _unique(stories: list[Story], path: Path) -> list[Story]:
    seen = set()
    for story in stories:
        if story.id in seen:
            raise BatchError(f"{path}: story id {story.id!r} appears twice; ids name the output folders")
        seen.add(story.id)
    return stories


def node_types(data: dict) -> set[str]:
    """Node types a workflow file names (front-end format with its subgraphs, or API format), without the host."""
    if conv.is_api_format(data.get("prompt", data) if isinstance(data.get("prompt"), dict) else data):
        api = data["prompt"] if isinstance(data.get("prompt"), dict) else data
        return {e["class_type"] for e in api.values()}
    subgraphs = (data.get("definitions") or {}).get("subgraphs") or []
    return {n.get("type") for graph in [data, *subgraphs] for n in graph.get("nodes", []) if isinstance(n, dict)}


def check_fillable(data: dict, where: str) -> None:
    if not node_types(data) & {STORY_PROMPT, ONE_PROMPT}:
        raise BatchError(f"{where}: no node to put the stories in; looked for {TARGET_TYPES}")


# ---------------------------------------------------------------------------------------------- one story
def _hash(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def _frame_text(story: str, line: int) -> str:
    """A frame line of the story without its caption and its [Name] tags: what happens in the frame."""
    body = story.splitlines()[line - 1].split("#", 1)[0]
    return re.sub(r"\s+", " ", story_plan.TAG.sub("", body)).strip(" ,")


def _as_one_prompt(story: Story, plan: story_plan.StoryPlan) -> tuple[str, list[str]]:
    if len(plan.characters) != 1:
        raise BatchError(f"story {story.id}: a One-Prompt-One-Story workflow tells one character's story; this "
                         f"story has {len(plan.characters)} character lines")
    return next(iter(plan.characters.values())), [_frame_text(story.story, f.line) for f in plan.frames]


def _seed_inputs(prompt: dict):
    """(inputs, name) of every literal seed of the prompt, in node order; a loader's seed (the tiny models' weights)
    is no sampling seed."""
    from .cli import TINY_NODES
    loaders = set(TINY_NODES.values())
    for _, entry in sorted(prompt.items(), key=lambda kv: conv._id_key(kv[0])):
        kind = entry["class_type"]
        if kind not in loaders and "Loader" not in kind and "Checkpoint" not in kind:
            for key in SEED_INPUTS:
                value = entry["inputs"].get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    yield entry["inputs"], key


class Job:
    """A workflow made ready once (converted, --quick/--ckpt/--tiny-model/--set applied) and run per story."""

    def __init__(self, config: dict):
        from . import cli
        self.config = config
        self.host = cli._boot(_Args(config))
        specs = conv.host_input_specs(self.host.nodes.NODE_CLASS_MAPPINGS)
        self.prompt = cli.prepare_prompt(self.host, _Args(config), conv.to_api(config["workflow"], specs).prompt)
        self.targets = {kind: [nid for nid, e in self.prompt.items() if e["class_type"] == kind]
                        for kind in (STORY_PROMPT, ONE_PROMPT)}
        if not any(self.targets.values()):
            raise BatchError(f"{config['workflow_name']}: no node to put the stories in (bypassed or muted?); "
                             f"looked for {TARGET_TYPES}")
        self.workflow_hash = _hash(self.prompt)
        self.keep = {}  # one executor for every story: models stay loaded between them
        self.scratch = Path(tempfile.mkdtemp(prefix="storykit-batch-"))
        weakref.finalize(self, shutil.rmtree, self.scratch, True)

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "workflow_hash": self.workflow_hash}

    def fill(self, story: Story) -> tuple[dict, list[str] | None]:
        """The prompt for one story and its frame prompts (None where the workflow builds them from links)."""
        prompt = copy.deepcopy(self.prompt)
        frames = None
        plan = None
        if story.story is not None:
            for nid in self.targets[STORY_PROMPT]:
                inputs = prompt[nid]["inputs"]
                inputs["story"] = story.story
                plan = self._plan(story, inputs)
                if plan is not None and frames is None:
                    frames = [f.prompt for f in plan.frames]
        elif self.targets[STORY_PROMPT]:  # a One-Prompt story told through a Story Prompt: one character, [Hero]
            text = "\n".join([f"[Hero] {story.identity_prompt}", *(f"[Hero] {f}" for f in story.frame_prompts)])
            return self.fill(Story(story.id, text, story.seed, story.set))
        if self.targets[ONE_PROMPT]:
            if story.identity_prompt is None:
                identity, lines = _as_one_prompt(story, plan or story_plan.parse_story(story.story, "", 1))
            else:
                identity, lines = story.identity_prompt, story.frame_prompts
            for nid in self.targets[ONE_PROMPT]:
                prompt[nid]["inputs"].update(identity_prompt=identity, frame_prompts="\n".join(lines))
            if not self.targets[STORY_PROMPT]:
                frames = [f"{identity} {line}" for line in lines]
        if story.seed is not None:
            for inputs, key in _seed_inputs(prompt):
                inputs[key] = story.seed
        conv.apply_overrides(prompt, [f"{k}={json.dumps(v)}" for k, v in story.set.items()])
        return prompt, frames

    @staticmethod
    def _plan(story: Story, inputs: dict) -> story_plan.StoryPlan | None:
        """Parse as the Story Prompt node will (its own line-numbered errors), before any model runs."""
        from ..nodes.nodes_consistent_attention import STYLES
        style, custom = inputs.get("style"), inputs.get("custom_style")
        refs, mode = inputs.get("references_per_character"), inputs.get("reference_mode")
        if not all(isinstance(v, (str, int)) for v in (style, custom, refs, mode)):
            return None  # driven by links: the node parses it when it runs
        template = custom if custom.strip() else STYLES.get(style, ("{prompt}", ""))[0]
        return story_plan.parse_story(story.story, template, refs, mode)

    def run(self, story: Story) -> dict:
        """{"record": manifest line, "files": {relative path: bytes}, "retry": whether a rerun may succeed}."""
        from . import cli, execute
        start = time.perf_counter()
        record = {"story_id": story.id, "workflow_hash": self.workflow_hash, "seeds": [], "files": [],
                  "prompts": [], "settings": self.settings(story), "seconds": 0.0, "status": "failed", "error": None}
        files, retry = {}, False
        folders = self.host.folder_paths
        previous = folders.get_output_directory()
        own = self.scratch / story.id
        shutil.rmtree(own, ignore_errors=True)  # what an earlier try left
        try:
            prompt, frames = self.fill(story)
            record["seeds"] = [inputs[key] for inputs, key in _seed_inputs(prompt)]
            for entry in prompt.values():  # output nodes unique per story: never served from the executor's cache
                if isinstance(entry["inputs"].get("filename_prefix"), str):
                    entry["inputs"]["filename_prefix"] = f"{story.id}/{entry['inputs']['filename_prefix']}"
            # One output folder for the Job's life: the executor keeps its Save nodes, which keep the folder they
            # were made with.
            folders.set_output_directory(str(self.scratch))
            result = execute.run_prompt(self.host, prompt, quiet=True, keep=self.keep)
            for _, images in sorted(result.outputs.items(), key=lambda kv: conv._id_key(str(kv[0]))):
                paths = cli._saved_files(self.host, {0: images})
                for path in paths:
                    rel = Path(path).relative_to(own if own in Path(path).parents else self.scratch).as_posix()
                    files[rel] = Path(path).read_bytes()
                    record["files"].append(f"{story.id}/{rel}")
                    record["prompts"].append(frames[paths.index(path)] if frames and len(paths) == len(frames)
                                             else None)
            record["status"] = "done"
        except execute.PromptFailed as exc:  # a node raised while running: out of memory, a flaky file system...
            record["error"], retry = str(exc), True
        except (conv.WorkflowError, ValueError) as exc:  # the story or its settings: the same on every try
            record["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - anything else fails this story, not the batch
            record["error"], retry = f"{type(exc).__name__}: {exc}", True
        finally:
            folders.set_output_directory(previous)
            shutil.rmtree(own, ignore_errors=True)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return {"record": record, "files": files, "retry": retry}

    def settings(self, story: Story) -> dict:
        config = self.config
        return {"workflow": config["workflow_name"], "set": list(config.get("overrides") or []) +
                [f"{k}={json.dumps(v)}" for k, v in story.set.items()], "quick": bool(config.get("quick")),
                "tiny_model": config.get("tiny_model"), "ckpt": config.get("ckpt"), "seed": story.seed}


class _Args:
    """The runner options a Job needs, as the attributes cli's helpers read."""

    def __init__(self, config: dict):
        for key in ("models", "input", "ckpt", "tiny_model", "quick"):
            setattr(self, key, config.get(key))
        self.overrides = list(config.get("overrides") or [])
        self.output = None


class StoryWorker:
    """What a Ray actor holds: one Job, booted once; stories are its method calls."""

    def __init__(self, config: dict):
        logging.getLogger("storykit").setLevel(logging.WARNING)
        self.job = Job(config)

    def info(self) -> dict:
        return self.job.info()

    def run(self, story: dict) -> dict:
        return self.job.run(Story(**story))


# ---------------------------------------------------------------------------------------------- the batch folder
class Manifest:
    """OUT/manifest.jsonl: a line per finished story, appended as each finishes (flushed and synced)."""

    def __init__(self, folder: Path, resume: bool):
        self.folder, self.path = folder, folder / MANIFEST
        self.records: dict[str, dict] = {}
        if not self.path.exists():
            if any(folder.iterdir() if folder.is_dir() else ()):
                raise BatchError(f"{folder} is not empty and holds no batch ({MANIFEST}): choose an empty or new "
                                 "--output")
            folder.mkdir(parents=True, exist_ok=True)
            self.path.touch()  # the folder holds a batch from now on: stopped before any story, it resumes
        elif self.path.stat().st_size and not resume:  # (an empty one: stopped before any story finished)
            raise BatchError(f"{folder} already holds a batch ({MANIFEST}): add --resume to run what is missing, "
                             "or choose another --output")
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is cut short (a crash while writing?): ignored", self.path, number)
                continue
            if record.get("status") == "done":
                self.records[record["story_id"]] = record
        # Failed stories run again: keep one line per story by dropping their old lines (atomically).
        text = "".join(json.dumps(r) + "\n" for r in self.records.values())
        atomic_write_bytes(self.path, text.encode(), overwrite=True)

    def done(self) -> set[str]:
        return set(self.records)

    def check_hash(self, workflow_hash: str) -> None:
        other = {r["workflow_hash"] for r in self.records.values()} - {workflow_hash}
        if other:
            raise BatchError(f"{self.folder}: its stories were made with another workflow or other settings "
                             f"(hash {sorted(other)[0]}, now {workflow_hash}); resume with the same ones, or choose "
                             "another --output")

    def commit(self, result: dict) -> dict:
        """Write a story's pictures into OUT/<id>/ (a leftover folder of an unrecorded run is kept aside), then
        append its line."""
        record = result["record"]
        if record["status"] == "done":
            target = self.folder / record["story_id"]
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            for rel, data in result["files"].items():
                atomic_write_bytes(staging / rel, data)
            if target.exists():
                n = 1
                while target.with_name(f"{target.name}.old-{n}").exists():
                    n += 1
                target.rename(target.with_name(f"{target.name}.old-{n}"))
            staging.rename(target)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["story_id"]] = record
        return record


class Bar:
    """One progress line over the batch."""

    def __init__(self, total: int, quiet: bool, stream=None):
        self.total, self.quiet, self.stream = total, quiet, stream or sys.stderr
        self.done = self.failed = 0
        self.start = time.perf_counter()

    def update(self, record: dict | None = None, note: str = "") -> None:
        if record is not None:
            self.done += record["status"] == "done"
            self.failed += record["status"] == "failed"
        if self.quiet:
            return
        finished = self.done + self.failed
        width = 30
        filled = int(width * finished / max(1, self.total))
        rate = finished / max(1e-9, time.perf_counter() - self.start) * 60
        text = f"batch |{'#' * filled}{'.' * (width - filled)}| {finished}/{self.total} stories"
        text += f", {self.failed} failed" if self.failed else ""
        text += f", {rate:.1f}/min" if finished else ""
        text += f"  {note}" if note else ""
        tty = self.stream.isatty()
        self.stream.write("\r\033[K" + text if tty else text + "\n")
        if tty and finished == self.total:
            self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- the two paths
def run_batch(stories: list[Story], config: dict, output: Path, resume: bool = False, retries: int = 2,
              ray_address: str | None = None, use_ray: bool = False, actors: int | None = None,
              quiet: bool = False, on_event=None) -> list[dict]:
    """Run the stories not yet done in `output`; return the manifest records of this run."""
    check_fillable(config["workflow"], config["workflow_name"])
    manifest = Manifest(Path(output), resume)
    todo = [s for s in stories if s.id not in manifest.done()]
    bar = Bar(len(todo), quiet)
    event = on_event or (lambda *a: None)
    if not todo:
        bar.update(note="nothing to do: every story is done")
        return []
    if use_ray or ray_address:
        return _run_on_ray(todo, config, manifest, bar, retries, ray_address, actors, event)
    job = Job(config)
    manifest.check_hash(job.workflow_hash)
    records = []
    for story in todo:
        event("story_started", story.id, os.getpid())
        for _attempt in range(retries + 1):
            result = job.run(story)
            if result["record"]["status"] == "done" or not result["retry"]:
                break
        records.append(manifest.commit(result))
        event("story_finished", story.id, records[-1])
        bar.update(records[-1], story.id)
    return records


def _connect(address: str | None):
    try:
        import ray
    except ImportError as exc:
        raise BatchError(f"--ray/--address need Ray, which is not installed: {RAY_HINT}") from exc
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as exc:
            raise BatchError(f"--address {address}: no Ray cluster answers there ({exc}); start one with "
                             "`ray start --head` on the head machine, and give its address as HOST:PORT or "
                             "ray://HOST:10001") from exc
    if ray.is_initialized():  # a cluster this process joined already (a notebook, a test)
        return ray, False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)  # --ray: a new one, here
    except ConnectionError as exc:
        raise BatchError(f"--address {address}: {exc} (start a cluster with `ray start --head`)") from exc
    return ray, True


def _worker_env() -> dict:
    """What a worker process needs to import this pack and find the same host: this process's settings."""
    import storykit
    env = {k: os.environ[k] for k in ("COMFYUI_PATH", "STORYKIT_DEVICE", "STORYKIT_CACHE") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(storykit.__file__).parent.parent),
                                                    os.environ.get("PYTHONPATH")) if p)
    return env


def _cpus_per_actor(ray, count: int) -> int:
    """CPU actors share out the machines' cores (Ray sets each actor's torch threads to its share), packed so that
    every actor fits on some machine."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [1]
    per_node = -(-count // len(nodes))
    return max(1, int(min(nodes)) // per_node)


def _run_on_ray(todo, config, manifest, bar, retries, address, actors, event) -> list[dict]:
    ray, started = _connect(address)
    from ray.exceptions import RayActorError
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or max(1, gpus)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": _cpus_per_actor(ray, count)}
    remote = ray.remote(StoryWorker).options(max_restarts=0, max_task_retries=0,
                                             runtime_env={"env_vars": _worker_env()}, **resources)
    queue = deque((s, 0) for s in todo)
    pending: dict = {}  # object ref -> ("info", actor) | ("story", actor, story, attempt)
    pids, live, records = {}, [], []
    boot_failures = 0

    def start_actor():
        actor = remote.remote(config)
        live.append(actor)
        pending[actor.info.remote()] = ("info", actor)

    def finish(result):
        records.append(manifest.commit(result))
        event("story_finished", result["record"]["story_id"], records[-1])
        bar.update(records[-1], result["record"]["story_id"])

    try:
        for _ in range(count):
            start_actor()
        idle = []
        while queue or any(p[0] == "story" for p in pending.values()):
            while idle and queue:
                actor = idle.pop()
                story, attempt = queue.popleft()
                pending[actor.run.remote(story.__dict__)] = ("story", actor, story, attempt)
                event("story_started", story.id, pids.get(actor))
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            kind, actor, *job = pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as exc:  # the process died (killed, out of memory, lost machine): replace it
                live.remove(actor)
                event("actor_died", pids.get(actor), str(exc))
                if kind == "info":
                    boot_failures += 1
                    if boot_failures > max(3, 2 * count) or not live:
                        raise BatchError(f"the Ray actors fail to start: {exc}") from exc
                else:
                    story, attempt = job
                    if attempt < retries:
                        queue.appendleft((story, attempt + 1))
                    else:
                        finish(_lost(story, config, f"its actor died {attempt + 1} times; last: {exc}"))
                start_actor()
                continue
            if kind == "info":
                manifest.check_hash(value["workflow_hash"])
                pids[actor] = value["pid"]
                event("actor_ready", value["pid"], value)
                idle.append(actor)
                continue
            story, attempt = job
            if value["record"]["status"] == "failed" and value["retry"] and attempt < retries:
                queue.appendleft((story, attempt + 1))
            else:
                finish(value)
            idle.append(actor)
    finally:
        for actor in live:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return records


def _lost(story: Story, config: dict, error: str) -> dict:
    record = {"story_id": story.id, "workflow_hash": "", "seeds": [], "files": [], "prompts": [],
              "settings": {"workflow": config["workflow_name"], "seed": story.seed}, "seconds": 0.0,
              "status": "failed", "error": error}
    return {"record": record, "files": {}, "retry": False}
