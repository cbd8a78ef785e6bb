# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 1: a double-forked grandchild in a session of its own, meant to outlive its item and
# write to the host later. The program ends (and passes) once the grandchild is running.
# Set by the test: MARKER (host path), DELAY (seconds), TAG (unique word in the grandchild's command line).
import os

r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # re-parented, own session and process group: a process-group kill misses it
        os.write(w, b"up")
        os.execv("/bin/sh", ["sh", "-c", f"sleep {DELAY}; echo escaped > {MARKER}", TAG])
    os._exit(0)
os.wait()
assert os.read(r, 2) == b"up"
