"""Validate and execute an API prompt through the host's own PromptExecutor, with a terminal progress bar."""
from __future__ import annotations

import asyncio
import inspect
import sys
import time
import uuid
from dataclasses import dataclass, field

from .convert import WorkflowError


class PromptInvalid(WorkflowError):
    pass


class PromptFailed(RuntimeError):
    pass


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict
    ran: set = field(default_factory=set)
    seconds: float = 0.0


class _TerminalServer:
    """The part of PromptServer the executor talks to; turns its events into a progress line."""

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

    def send_sync(self, event, data, sid=None):
        if event == "executing" and data.get("node") is not None:
            self.executed.add(str(data["node"]))
            self._status(data["node"], None)
        elif event == "progress":
            self._status(data.get("node"), (data.get("value", 0), data.get("max", 0)))
        elif event == "executed":
            self.executed.add(str(data.get("node")))
        elif event == "execution_cached":
            self.executed.update(str(n) for n in data.get("nodes", []))
        elif event == "execution_error":
            self.error = data

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
            text += f" |{'#' * filled}{'.' * (width - filled)}| {value}/{total}"
        self.stream.write("\r\033[K" + text if tty else text + "\n")
        self.stream.flush()
        self._line = tty

    def finish(self):
        if self._line:
            self.stream.write("\n")
            self.stream.flush()


def _progress_hook(server: _TerminalServer):
    def hook(value, total, preview_image=None, prompt_id=None, node_id=None):
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        server.send_sync("progress", {"value": value, "max": total, "node": node_id or server.last_node_id})
    return hook


def validate(execution, prompt: dict, prompt_id: str):
    """The host's validate_prompt, with its errors turned into one readable message."""
    sig = inspect.signature(execution.validate_prompt)
    args = (prompt_id, prompt, None) if len(sig.parameters) >= 3 else (prompt,)
    result = execution.validate_prompt(*args)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    ok, error, outputs, node_errors = result
    if ok:
        return outputs
    lines = [error.get("message", "invalid prompt") if isinstance(error, dict) else str(error)]
    if isinstance(error, dict) and error.get("details"):
        lines.append(str(error["details"]))
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {_explain(err)}")
    raise PromptInvalid("\n".join(lines))


def _explain(err: dict) -> str:
    details = err.get("details") or ""
    message = err.get("message", "")
    if err.get("type") == "value_not_in_list":
        extra = err.get("extra_info") or {}
        name = extra.get("input_name", "")
        value = extra.get("received_value", "")
        if name.endswith("_name") or str(value).endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            return (f"model file {value!r} (input {name}) is not in the models folder: put it there, point "
                    "--models at the folder that holds it, or choose another with --set NODE.INPUT=FILE")
    return f"{message}: {details}" if details else message


def run_prompt(host, prompt: dict, quiet: bool = False, stream=None, keep: dict | None = None) -> RunResult:
    """Validate and execute; raise PromptFailed unless every output node ran. `keep`: a dict the caller holds to
    reuse one executor across runs, as the host's own prompt worker does (its cache keeps loaded models)."""
    import comfy.utils
    execution = host.execution
    prompt_id = str(uuid.uuid4())
    outputs = validate(execution, prompt, prompt_id)
    server = _TerminalServer(prompt, stream=stream, quiet=quiet)
    executor = (keep or {}).get("executor")
    if executor is None:
        kwargs = {}
        if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
            kwargs["cache_args"] = {"lru": 0, "ram": 0}
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, **kwargs)
        if keep is not None:
            keep["executor"] = executor
    executor.server = server
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    start = time.perf_counter()
    try:
        executor.execute(prompt, prompt_id, extra_data={"client_id": "storykit-runner"}, execute_outputs=outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        server.finish()
    seconds = time.perf_counter() - start
    if server.error is not None or not executor.success:
        err = server.error or {}
        raise PromptFailed(f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
                           f"{err.get('exception_type', '')}: {err.get('exception_message', 'unknown error')}")
    ran = {str(n) for n in server.executed}
    not_run = [o for o in outputs if str(o) not in ran]
    if not_run:
        raise PromptFailed("output nodes did not run: " + ", ".join(map(str, not_run)))
    return RunResult(prompt_id, executor.history_result.get("outputs", {}), ran, seconds)
