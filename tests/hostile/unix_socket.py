# ruff: noqa: F821 (the names in capitals are set by the test)
# Attack 5c: reach the host through sockets: Unix sockets by path and abstract name, and TCP
# on loopback. Passes only when no connection was made.
# Set by the test: SOCKETS (paths), ABSTRACT (names), PORTS.
import socket

reached = []
for address in [*SOCKETS, *("\0" + name for name in ABSTRACT)]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(address)
        reached.append(address)
    except OSError:
        pass
for port in PORTS:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1)
        reached.append(port)
    except OSError:
        pass
assert not reached, reached
