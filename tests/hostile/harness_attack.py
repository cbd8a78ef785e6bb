# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 3: without root, write into the harness user's folder and SIGKILL the harness.
# Set by the test: HARNESS_DIR (a folder the harness user owns), HARNESS_PID.
import os
import signal

done = []
for path in (os.path.join(HARNESS_DIR, "pwned"), "/pwned"):
    try:
        with open(path, "w") as f:
            f.write("pwned")
        done.append(path)
    except OSError:
        pass
for pid in (HARNESS_PID, -1):
    try:
        os.kill(pid, signal.SIGKILL)
        done.append(f"kill({pid})")
    except OSError:
        pass
assert not done, done
