# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 2: reach the other items. For DURATION seconds, from the program and from a setsid
# grandchild, look for any other item's program and overwrite it with a passing one, and
# signal every process this user may signal with SIGUSR1 (which kills a process that does not
# handle it: another item would end "killed: signal SIGUSR1"). This item ignores SIGUSR1 so its
# own processes survive each other. Passes only when no other program was found.
# Set by the test: DURATION (seconds).
import glob
import os
import signal
import time

PATTERNS = ["/tmp/qp-sandbox-*/program.py", "/tmp/*/program.py", "/proc/*/cwd/program.py", "/proc/*/root/tmp/*", "/proc/*/root/program.py"]


def attack():
    reached = []
    end = time.time() + DURATION
    while time.time() < end:
        for path in {p for pattern in PATTERNS for p in glob.glob(pattern)}:
            try:
                with open(path, "w") as f:
                    f.write("pass\n")
                reached.append(path)
            except OSError:
                pass
        try:
            os.kill(-1, signal.SIGUSR1)
        except OSError:
            pass
        time.sleep(0.05)
    return reached


signal.signal(signal.SIGUSR1, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        attack()  # keeps going after the item, were it allowed to
    os._exit(0)
os.wait()
reached = attack()
assert not reached, sorted(set(reached))
