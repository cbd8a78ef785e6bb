# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 5a: read the project, the data, artifacts, home folders and the host's /tmp. Passes
# only when none of PATHS exists in the sandbox at all (not merely unreadable), while the
# interpreter's own library can be read.
# Set by the test: PATHS.
import errno
import os

leaks = []
for path in PATHS:
    try:
        if os.path.isdir(path):
            leaks.append(f"{path}: {sorted(os.listdir(path))[:5]}")
        else:
            with open(path, "rb") as f:
                leaks.append(f"{path}: {f.read(40)!r}")
    except OSError as e:
        if e.errno != errno.ENOENT:
            leaks.append(f"{path}: exists ({e.strerror})")
assert not leaks, leaks
with open(os.__file__) as f:
    assert "def " in f.read()
