# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack: read a secret the harness keeps in its session keyring (whoever holds a keyring may
# read the keys in it, whatever its uid). Passes only when the key cannot be found.
# Set by the test: DESCRIPTION (the key's name). x86_64 syscall numbers.
import ctypes

libc = ctypes.CDLL(None, use_errno=True)
KEYCTL, KEYCTL_SEARCH, KEYCTL_READ, SESSION_KEYRING = 250, 10, 11, -3
key = libc.syscall(KEYCTL, KEYCTL_SEARCH, SESSION_KEYRING, b"user", DESCRIPTION.encode(), 0)
secret = b""
if key > 0:
    buf = ctypes.create_string_buffer(256)
    n = libc.syscall(KEYCTL, KEYCTL_READ, key, buf, 256)
    secret = buf.raw[: max(n, 0)]
assert key < 0, f"read the harness's key {key}: {secret!r}"
