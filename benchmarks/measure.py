"""What every benchmark script measures with: interleaved timing, peak memory, plain output (no host imports).

Scripts import it as a sibling (`python benchmarks/bench_x.py` puts benchmarks/ on sys.path).
"""
from __future__ import annotations

import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakTensorBytes(TorchDispatchMode):
    """Peak live bytes of the tensors created inside the block, counted by storage over every aten op's outputs.

    A storage is counted once however many views of it exist, and released when its last view dies; outputs that
    are views of tensors made outside the block (inputs, weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list] = {}

    def _release(self, ptr):
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outside = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                   if torch.is_tensor(t)} - self.refs.keys()
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in outside or storage.nbytes() == 0:
                continue
            entry = self.refs.get(ptr)
            if entry is None:
                entry = self.refs[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_bytes(fn) -> int:
    """CUDA: max_memory_allocated above what was allocated before; CPU: PeakTensorBytes over the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakTensorBytes() as counter:
        fn()
    return counter.peak


def interleaved_times(fns: dict, repeats: int, warmup: int = 1, cpu_time: bool = False) -> dict[str, float]:
    """Median seconds per variant; the variants take turns in every repeat, so load that comes and goes on a shared
    machine falls on all of them alike. cpu_time (CPU only): this process's CPU time instead of wall-clock time."""
    clock = time.process_time if cpu_time and not torch.cuda.is_available() else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
