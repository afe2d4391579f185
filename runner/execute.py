"""Validate and execute an API prompt through the host's own PromptExecutor, with a terminal progress bar."""
from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .convert import WorkflowError


class PromptInvalid(WorkflowError):
    pass


class PromptFailed(RuntimeError):
    pass


class PromptCancelled(PromptFailed):
    """The run was interrupted (Cancel, Ctrl-C); `saved` lists what nodes saved on the way out, with how to resume."""

    def __init__(self, message: str, saved: list[str]):
        super().__init__(message)
        self.saved = saved


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict
    ran: set = field(default_factory=set)
    seconds: float = 0.0


class _TerminalServer:
    """The part of PromptServer the executor talks to; turns its events into a progress line.

    What the executors call on it, read in their sources (0.3.64, 0.3.75, Comfy-Org/ComfyUI 0.4x): `client_id`
    and `last_node_id` (set and read by execution.execute), `send_sync(event, data, sid)`, `sockets_metadata` and
    `client_id` again in comfy_execution/progress.py's WebUIProgressHandler (feature_flags.supports_feature), and
    `last_prompt_id` in main.py's progress hook. `queue_updated` is PromptQueue's.
    """

    def __init__(self, prompt: dict, stream=None, quiet: bool = False):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.prompt = prompt
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.executed: set[str] = set()
        self.error: dict | None = None
        self._line = False
        self._last_tenth: dict = {}
        self._drawn: dict = {}

    def send_sync(self, event, data, sid=None):
        if event == "executing" and data.get("node") is not None:
            self.executed.add(str(data["node"]))
            self._status(data["node"], None)
        elif event == "progress_state":
            self._progress_state(data.get("nodes") or {})
        elif event == "progress":
            self._status(data.get("node"), (data.get("value", 0), data.get("max", 0)))
        elif event == "executed":
            self.executed.add(str(data.get("node")))
        elif event == "execution_cached":
            self.executed.update(str(n) for n in data.get("nodes", []))
        elif event == "execution_error":
            self.error = data

    def _progress_state(self, nodes: dict) -> None:
        """The progress registry's view (every started node, each time): draw the running ones that moved."""
        for node_id, state in nodes.items():
            if not isinstance(state, dict) or state.get("state") != "running":
                continue
            value, total = state.get("value", 0), state.get("max", 0)
            if self._drawn.get(node_id) == (value, total):
                continue
            self._drawn[node_id] = (value, total)
            if value == 0 and total <= 1:  # start_progress's marker, not a bar
                continue
            self._status(state.get("display_node_id") or node_id, (value, total))

    def queue_updated(self):
        pass

    def _status(self, node_id, progress):
        if self.quiet or node_id is None:
            return
        entry = self.prompt.get(str(node_id), {})
        label = (entry.get("_meta") or {}).get("title") or entry.get("class_type", "?")
        text = f"[{node_id}] {label}"
        tty = self.stream.isatty()
        if progress and progress[1]:
            value, total = progress
            tenth = int(10 * value / total)
            if not tty and tenth == self._last_tenth.get(node_id) and value != total:
                return  # a log file gets a line per tenth of the way, not one per step
            self._last_tenth[node_id] = tenth
            width = 30
            filled = int(width * value / total)
            text += f" |{'#' * filled}{'.' * (width - filled)}| {value:g}/{total:g}"
        self.stream.write("\r\033[K" + text if tty else text + "\n")
        self.stream.flush()
        self._line = tty

    def finish(self):
        if self._line:
            self.stream.write("\n")
            self.stream.flush()


def _progress_hook(server: _TerminalServer):
    """comfy.utils.ProgressBar's hook, as the host's own main.py sets it (hijack_progress, the same in 0.3.64, 0.3.75
    and 0.4x): find the running node, honour Cancel, and report into the host's progress registry
    (comfy_execution.progress), whose WebUIProgressHandler, installed by the executor, sends "progress_state" to the
    server. Nodes that use the V3 API's `set_progress` write to the same registry, so both reach the terminal.
    A host without the registry gets the old direct "progress" event."""
    try:
        from comfy_execution.progress import get_progress_state
    except ImportError:
        get_progress_state = None
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        get_executing_context = None

    def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
        import comfy.model_management
        context = get_executing_context() if get_executing_context is not None else None
        if node_id is None and context is not None:
            node_id = context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if node_id is None:
            node_id = server.last_node_id
        if get_progress_state is not None and node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        else:
            server.send_sync("progress", {"value": value, "max": total, "node": node_id}, server.client_id)
    return hook


# cache_args keys any supported host's executor reads (0.3.75: lru, ram; 0.4x adds ram_inactive, read on every
# run by execute_async); main.py's own keys are added when its source can be read.
CACHE_ARGS_KEYS = ("lru", "ram", "ram_inactive")


def main_py_cache_args(main_py: str | Path) -> tuple[str, ...] | None:
    """The keys the host's main.py puts in PromptExecutor(cache_args={...}) (its prompt_worker), read from its source.

    () when main.py builds the executor without cache_args (0.3.64 passes cache_size=); None when it cannot be read.
    """
    try:
        tree = ast.parse(Path(main_py).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and getattr(func, "attr", getattr(func, "id", None)) == "PromptExecutor":
            for kw in node.keywords:
                if kw.arg == "cache_args" and isinstance(kw.value, ast.Dict):
                    return tuple(k.value for k in kw.value.keys
                                 if isinstance(k, ast.Constant) and isinstance(k.value, str))
            return ()
    return None


def make_executor(execution, server, main_py: str | Path | None = None):
    """A PromptExecutor built the way the host's own main.py builds it when started with --cache-classic.

    Classic caching drops intermediate outputs as soon as they are used (one prompt per run here). Its cache_args are
    all 0, as main.py's are under --cache-classic (0.3.75: --cache-lru 0, --cache-ram 0; 0.4x sets ram and
    ram_inactive to 0 unless a RAM-pressure cache is chosen). Newer executors take `asset_manager` (None: the host's
    NoAssets); 0.3.64's takes `cache_size`.
    """
    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in params:
        keys = set(CACHE_ARGS_KEYS) | set((main_py_cache_args(main_py) if main_py else None) or ())
        kwargs["cache_args"] = dict.fromkeys(sorted(keys), 0)
    elif "cache_size" in params:
        kwargs["cache_size"] = 0
    if "asset_manager" in params:
        kwargs["asset_manager"] = None
    return execution.PromptExecutor(server, **kwargs)


# What the host only logs and then ignores: a workflow whose embedding or LoRA did not load is not a success.
IGNORED_FILE = re.compile(r"error loading embedding, skipping loading: (?P<emb>.+)$|embedding:(?P<missing>\S+) does not "
                          r"exist, ignoring|(?P<shape>shape mismatch when trying to apply embedding)|"
                          r"lora key not loaded: (?P<lora>.+)$", re.S)


class _HostLog(logging.Handler):
    """Collects, with the node that was running: the host's warnings about model files it skipped, and the states
    pack nodes saved when cancelled (log records with a `storykit_saved` path and a `storykit_resume` input)."""

    def __init__(self, server):
        super().__init__(logging.WARNING)
        self.server = server
        self.problems: list[str] = []
        self.saved: list[str] = []

    def emit(self, record):
        node = self.server.last_node_id
        entry = self.server.prompt.get(str(node), {})
        where = f"node {node} ({entry.get('class_type', '?')})"
        if getattr(record, "storykit_saved", None):
            name = os.path.basename(record.storykit_saved)
            resume = getattr(record, "storykit_resume", None)
            hint = f"--set {node}.{resume}={name}" if resume and "=" not in resume else resume or ""
            self.saved.append(f"{where} saved {record.storykit_saved}" + (f"; resume with {hint}" if hint else ""))
            return
        match = IGNORED_FILE.search(record.getMessage())
        if not match or len(self.problems) >= 20:
            return
        if match["emb"] or match["missing"]:
            name = (match["emb"] or match["missing"]).strip()
            if any(f"embedding {name!r}" in p for p in self.problems):
                return  # the host reports a damaged file as missing too
            what = (f"embedding {name!r} could not be read (damaged file)" if match["emb"] else
                    f"embedding {name!r} is not in the embeddings folder")
        elif match["shape"]:
            what = "an embedding was made for another text encoder and was ignored"
        else:
            what = f"the LoRA does not fit this model (key {match['lora'].strip()} not loaded)"
        self.problems.append(f"{where}: {what}")


def validate(execution, prompt: dict, prompt_id: str):
    """The host's validate_prompt, with its errors turned into one readable message."""
    sig = inspect.signature(execution.validate_prompt)
    args = (prompt_id, prompt, None) if len(sig.parameters) >= 3 else (prompt,)
    result = execution.validate_prompt(*args)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    ok, error, outputs, node_errors = result
    # The host still answers ok when some outputs are valid and runs only those: a run that cannot do all it was
    # asked to is invalid here, so any node error fails the whole prompt.
    if ok and not node_errors:
        return outputs
    if ok:
        error = {"message": "Prompt outputs failed validation"}
    lines = [error.get("message", "invalid prompt") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        lines.append(str(error["details"]))
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {_explain(err, node_id)}")
    raise PromptInvalid("\n".join(lines))


def _explain(err: dict, node_id="NODE") -> str:
    details = err.get("details") or ""
    message = err.get("message", "")
    if err.get("type") == "value_not_in_list":
        extra = err.get("extra_info") or {}
        name = extra.get("input_name", "")
        value = extra.get("received_value", "")
        if name.endswith("_name") or str(value).endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            return (f"model file {value!r} (input {name}) is not in the models folder: put it there, point "
                    "--models at the folder that holds it, or choose another with --set NODE.INPUT=FILE")
    if err.get("type") in ("value_smaller_than_min", "value_bigger_than_max", "invalid_input_type"):
        name = (err.get("extra_info") or {}).get("input_name") or details
        return f"input {name}: {message}: give a value in range in the workflow or with --set {node_id}.{name}=VALUE"
    return f"{message}: {details}" if details else message


def run_prompt(host, prompt: dict, quiet: bool = False, stream=None, keep: dict | None = None) -> RunResult:
    """Validate and execute; raise PromptFailed unless every output node ran. `keep`: a dict the caller holds to
    reuse one executor across runs, as the host's own prompt worker does (its cache keeps loaded models)."""
    import comfy.utils
    execution = host.execution
    prompt_id = str(uuid.uuid4())
    outputs = validate(execution, prompt, prompt_id)
    server = _TerminalServer(prompt, stream=stream, quiet=quiet)
    server.last_prompt_id = prompt_id  # as main.py's prompt_worker does
    executor = (keep or {}).get("executor")
    if executor is None:
        executor = make_executor(execution, server, Path(host.path) / "main.py")
        if keep is not None:
            keep["executor"] = executor
    executor.server = server
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    start = time.perf_counter()
    ignored = _HostLog(server)
    logging.getLogger().addHandler(ignored)
    try:
        executor.execute(prompt, prompt_id, extra_data={"client_id": "storykit-runner"}, execute_outputs=outputs)
    finally:
        logging.getLogger().removeHandler(ignored)
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        server.finish()
    seconds = time.perf_counter() - start
    if server.error is None and not executor.success:  # the host reports an interrupt with no error event
        raise PromptCancelled("cancelled" + "".join(f"\n  {line}" for line in ignored.saved), ignored.saved)
    if server.error is not None or not executor.success:
        err = server.error or {}
        raise PromptFailed(f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
                           f"{err.get('exception_type', '')}: {err.get('exception_message', 'unknown error')}")
    if ignored.problems:
        raise PromptFailed("the host skipped files this workflow uses:\n  " + "\n  ".join(ignored.problems)
                           + "\n  replace the file or remove it from the prompt")
    ran = {str(n) for n in server.executed}
    not_run = [o for o in outputs if str(o) not in ran]
    if not_run:
        raise PromptFailed("output nodes did not run: " + ", ".join(map(str, not_run)))
    return RunResult(prompt_id, executor.history_result.get("outputs", {}), ran, seconds)
