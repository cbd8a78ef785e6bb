"""The sandbox's self-check (code_exec.check_sandbox): run as an item's program, with
`check(uid, hidden, scratch)` appended, it asserts from inside what sandbox_description() claims.
Standard library only: it runs under whichever interpreter the sandbox picks."""

import os
import socket


def check(uid, hidden, scratch):
    assert os.getpid() == 2, f"pid {os.getpid()}: not in a fresh PID namespace"
    assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k.startswith("Cap")}
    assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == int(caps["CapBnd"], 16) == 0, caps
    assert os.getuid() == uid, os.getuid()
    for path in hidden:
        assert not os.path.exists(path), f"{path} is visible"
    for path in ("/", "/usr", "/etc", "/dev"):
        assert not os.access(path, os.W_OK), f"{path} is writable"
    open("/tmp/x", "w").write("x")
    assert os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize == scratch, "scratch size"
