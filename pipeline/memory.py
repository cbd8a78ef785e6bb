"""Peak memory of this process during a block of code.

CPU: the kernel keeps the resident-set high-water mark (VmHWM in /proc/self/status), and writing
"5" to /proc/self/clear_refs resets it to the current resident set, so the peak of a block is
read exactly, with no sampling. Freed heap pages that glibc keeps would count as "resident at
start" and hide growth, so the block starts after gc and malloc_trim. Where clear_refs is not
writable, a thread samples VmRSS every 2 ms (short spikes can be missed); without /proc at all,
ru_maxrss (the lifetime peak) is reported, an upper bound.
GPU: torch.cuda's allocator statistics (max_memory_allocated), reset at the start of the block.
GPU, another engine's processes (device "gpu-process-tree", vLLM): the GPU memory NVML reports
for this process and every process it started, summed over the GPUs, read when the block ends.
vLLM reserves its share of each GPU (weights, activations, KV cache) when the engine starts and
keeps it until the engine ends, so that reading is the block's peak.

Blocks may nest: an inner block's reset would erase the outer's high-water mark, so the mark is
folded into every enclosing block before each reset.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakMemory:
    device: str
    start_bytes: int = 0  # resident (CPU) or allocated (GPU) when the block began
    bytes: int = 0  # peak during the block, absolute; set when the block ends
    _seen: int = field(default=0, repr=False)  # high-water marks folded in by nested blocks

    @property
    def grown_bytes(self) -> int:
        return max(0, self.bytes - self.start_bytes)


_active: list[PeakMemory] = []


def _status_kb(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_hwm() -> bool:
    for outer in _active:  # the reset erases their mark: keep it
        outer._seen = max(outer._seen, _status_kb("VmHWM"))
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _status_kb("VmRSS")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _status_kb("VmRSS"))


@contextmanager
def peak_memory_bytes(device: str = "cpu"):
    """`with peak_memory_bytes() as m: ...` then m.bytes is this process's peak resident set
    during the block (m.grown_bytes: above what was resident when it began). device="cuda":
    peak bytes allocated by torch on the current GPU instead."""
    m = PeakMemory(device)
    if device == "gpu-process-tree":
        try:
            yield m
        finally:
            per_gpu = process_tree_gpu_bytes()
            m.bytes = sum(per_gpu.values()) if per_gpu else 0
        return
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m.start_bytes = torch.cuda.memory_allocated()
        try:
            yield m
        finally:
            torch.cuda.synchronize()
            m.bytes = torch.cuda.max_memory_allocated()
        return
    if not _STATUS.exists():  # no /proc (macOS): lifetime peak, an upper bound
        m.start_bytes = resident_bytes()
        try:
            yield m
        finally:
            m.bytes = resident_bytes()
        return
    _trim_heap()
    m.start_bytes = _status_kb("VmRSS")
    sampler = None
    if not _reset_hwm():
        sampler = _Sampler()
        sampler.start()
    _active.append(m)
    try:
        yield m
    finally:
        _active.remove(m)
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
            m.bytes = max(sampler.peak, _status_kb("VmRSS"), m._seen)
        else:
            m.bytes = max(_status_kb("VmHWM"), m._seen)
        for outer in _active:
            outer._seen = max(outer._seen, m.bytes)


def memory_available_bytes() -> int:
    """What this process could still grow by: MemAvailable (Linux), else total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """Resident set of this process now (without /proc: its lifetime peak)."""
    if _STATUS.exists():
        return _status_kb("VmRSS")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def held_bytes(device: str = "cpu") -> int:
    """What this process holds now, freed heap released first: resident set (CPU) or bytes allocated
    by torch (GPU). A row's peak is measured above this, taken before its model loads, so it does
    not depend on what the process did before (builds, other rows)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0
    _trim_heap()
    return resident_bytes()


def descendants(pid: int) -> set[int]:
    """Every process `pid` started, and theirs, now (Linux /proc; empty elsewhere)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:  # the process ended meanwhile
                continue
            todo += kids - out
            out |= kids
    return out


def gpu_bytes_by_pid(pids: set[int], used: dict[int, list[tuple[int, int | None]]]) -> dict[int, int]:
    """GPU index -> bytes held by `pids`, from NVML's per-GPU (pid, used bytes) lists."""
    out = {}
    for gpu, procs in used.items():
        held = sum(b or 0 for p, b in procs if p in pids)
        if held:
            out[gpu] = held
    return out


def _nvml_used() -> dict[int, list[tuple[int, int | None]]]:
    import pynvml  # nvidia-ml-py: installed with vLLM (and torch's CUDA builds)

    pynvml.nvmlInit()
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out[i] = [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
        return out
    finally:
        pynvml.nvmlShutdown()


def process_tree_gpu_bytes(pid: int | None = None) -> dict[int, int] | None:
    """GPU index -> bytes held by this process and its descendants (None: NVML unavailable).
    In a container NVML may report host pids; then nothing matches and the result is empty."""
    import os

    pid = pid or os.getpid()
    try:
        used = _nvml_used()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: no GPU figure
        return None
    return gpu_bytes_by_pid({pid} | descendants(pid), used)
