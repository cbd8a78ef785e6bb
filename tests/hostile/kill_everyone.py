# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 2b/3: SIGKILL everything: kill(-1), the harness, unrelated processes the test started
# (root's and nobody's), and every small pid. Passes only when no signal was delivered.
# Set by the test: HARNESS_PID, VICTIM_PIDS.
import os
import signal

hits = []
for target in [-1, HARNESS_PID, *VICTIM_PIDS, *range(2, 500)]:
    if target == os.getpid():
        continue
    try:
        os.kill(target, signal.SIGKILL)
        hits.append(target)
    except OSError:
        pass
# PID 1 (the item's init) ignores signals from inside its namespace; were it killed, the item would end here unreported
try:
    os.kill(1, signal.SIGKILL)
except OSError:
    pass
assert not hits, hits
