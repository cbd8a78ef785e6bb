"""One line per finished plan step, with an ETA from this run's measured step costs."""

from __future__ import annotations

import logging

from .plan import Step

log = logging.getLogger("quantpipe")


class Progress:
    """One line per step: position, what, seconds, and an ETA from the measured cost of this run's
    computed steps of the same kind (per task for evaluations)."""

    def __init__(self, steps: list[Step]):
        self.total, self.done, self.cost = len(steps), 0, {}
        self.remaining = list(steps)

    @staticmethod
    def _kind(step: Step) -> str:
        return f"{step.kind}:{step.task or step.stage_name or ''}"

    def finished(self, step: Step, seconds: float, reused: bool, failed: bool = False) -> None:
        self.done += 1
        self.remaining.remove(step)
        if not reused and not failed:
            self.cost.setdefault(self._kind(step), []).append(seconds)
        known = [sum(v) / len(v) for s in self.remaining if (v := self.cost.get(self._kind(s)))]
        eta = f", ETA {_duration(sum(known))}" if known and len(known) == len(self.remaining) else ""
        what = "FAILED" if failed else ("reused" if reused else f"{seconds:.1f} s")
        width = len(str(self.total))
        log.info("[%*d/%d] %s: %s%s", width, self.done, self.total, step.id, what, eta)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"
