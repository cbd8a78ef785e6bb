"""Peak memory of a block of work: resident set on CPU, allocated memory on a CUDA GPU."""

from __future__ import annotations

from pathlib import Path


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """`with PeakMemory() as p: ...; p.bytes` — the process's peak resident set during the block
    (the kernel's high-water mark, reset on entry where /proc allows it), or the peak CUDA
    allocation when a GPU is in use."""

    def __enter__(self) -> PeakMemory:
        self.bytes = None
        self.cuda = False
        try:
            import torch

            self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass
        try:  # "5" resets VmHWM to the current resident set (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            self.bytes = _vm_hwm()
