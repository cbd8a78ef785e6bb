# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 5b: fill the disk through /tmp. Passes only when the writes stop with "no space" at
# the scratch's cap, and nothing else (/, /usr, /etc, /dev, /var/tmp, /root) takes a file.
# Set by the test: CAP (bytes).
import errno
import os

written = 0
try:
    for i in range(4 * CAP >> 20):
        with open(f"/tmp/fill{i}", "wb") as f:
            f.write(b"x" * (1 << 20))  # 1 MiB a file: the per-file size limit is not what stops it
        written += 1 << 20
    raise AssertionError(f"wrote {written} bytes past a {CAP}-byte cap")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
assert CAP - (2 << 20) <= written <= CAP, written
for folder in ("/", "/usr", "/etc", "/dev", "/var/tmp", "/root"):
    try:
        with open(os.path.join(folder, "x"), "w") as f:
            f.write("x")
        raise AssertionError(f"{folder} is writable")
    except OSError:
        pass
