# quantpipe sandbox init
"""PID 1 of an item's namespaces (code_exec.py runs this file by path with `-I -S`, by the system
python3, else ours), as root or as the user namespace's root. Reports set-up failures on stderr as
"sandbox-init: ..." with exit 125. Standard library only: it runs under whichever interpreter the
sandbox picks, before the new root hides this package."""

import ctypes
import os
import resource
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
# (pivot_root, keyctl) syscall numbers: glibc before 2.34 has no pivot_root, and none has keyctl
SYSCALLS = {"x86_64": (155, 250), "aarch64": (41, 219), "riscv64": (41, 219), "ppc64le": (203, 280), "s390x": (217, 280)}


def fail(what):
    os.write(2, f"sandbox-init: {what}\n".encode())
    os._exit(125)


def check(rc, what):
    if rc != 0:
        fail(f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {src or fstype} on {dst}")


def ro_bind(src, dst):
    # Read-only, with its submounts. Keep the flags a user namespace locks (noexec, atime), or the remount is refused.
    mount(src, dst, flags=MS_BIND | MS_REC)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\") for line in f]
    for m in sorted({p for p in points if p == dst or p.startswith(dst + "/")}):
        st = os.statvfs(m).f_flag
        keep = (MS_NOEXEC if st & os.ST_NOEXEC else 0) | (MS_NODIRATIME if st & os.ST_NODIRATIME else 0)
        keep |= MS_NOATIME if st & os.ST_NOATIME else MS_RELATIME if st & os.ST_RELATIME else MS_STRICTATIME
        mount(None, m, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def build_root():
    if os.uname().machine not in SYSCALLS:
        fail(f"unsupported architecture {os.uname().machine}")
    mount(None, "/", flags=MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    for d in ("usr", "etc", "dev", "proc", "tmp", ".old"):
        os.mkdir(f"{root}/{d}")
    ro_bind("/usr", f"{root}/usr")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr links, or real folders
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
        elif os.path.isdir(f"/{name}"):
            os.mkdir(f"{root}/{name}")
            ro_bind(f"/{name}", f"{root}/{name}")
    for path in binds:  # the interpreter's prefix when it lies outside /usr
        os.makedirs(root + path)
        ro_bind(path, root + path)
    # /etc: the loader's cache and an account for the item's user, nothing of the host's configuration
    if os.path.isfile("/etc/ld.so.cache"):
        open(f"{root}/etc/ld.so.cache", "w").close()
        ro_bind("/etc/ld.so.cache", f"{root}/etc/ld.so.cache")
    with open(f"{root}/etc/passwd", "w") as f:
        f.write(f"sandbox:x:{uid}:{gid}::/tmp:/usr/sbin/nologin\n")
    with open(f"{root}/etc/group", "w") as f:
        f.write(f"sandbox:x:{gid}:\n")
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        mount(f"/dev/{dev}", f"{root}/dev/{dev}", flags=MS_BIND)
    for link, target in (
        ("shm", "/tmp"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{root}/dev/{link}")
    # a /proc of this PID namespace only (mounted while the host's is still visible, as user namespaces require)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch},nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
    check(libc.syscall(SYSCALLS[os.uname().machine][0], root.encode(), f"{root}/.old".encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", 2), "detach the host's root")  # MNT_DETACH: the host tree is gone from here on
    os.rmdir("/.old")
    mount(None, "/", flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def start_program():
    try:
        for limit, value in (
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_AS, mem),
            (resource.RLIMIT_FSIZE, 1 << 20),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, 64),
        ):
            resource.setrlimit(limit, (value, value))
        with open("/proc/sys/kernel/cap_last_cap") as f:
            for cap in range(int(f.read()) + 1):  # empty bounding set: no exec can regain a capability
                check(libc.prctl(24, cap, 0, 0, 0), "drop the capability bounding set")  # PR_CAPBSET_DROP
        if setuid == "1":
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # a new, empty session keyring: the harness's would let the program read its keys as their possessor
        if libc.syscall(SYSCALLS[os.uname().machine][1], 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING
            fail(f"join a new session keyring: {os.strerror(ctypes.get_errno())}")
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # capability v3: all zero
        check(libc.capset(header, data), "drop capabilities")
        check(libc.prctl(38, 1, 0, 0, 0), "set no_new_privs")  # PR_SET_NO_NEW_PRIVS
        os.chdir("/tmp")
        os.execve(python, [python, "-I", "-B", "-c", wrapper], {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"})
    except BaseException as e:  # noqa: BLE001 - any failure to start is reported as a set-up failure
        fail(f"starting the program: {e!r}")


if __name__ == "__main__":
    # positional arguments (json would double the start-up time)
    root, uid, gid, setuid, python, scratch, mem, cpu, alarm, wrapper, *binds = sys.argv[1:]
    uid, gid, scratch, mem, cpu, alarm = int(uid), int(gid), int(scratch), int(mem), int(cpu), int(alarm)
    # our pid on the host (whose /proc is still mounted here): the harness kills us by it at the timeout
    os.write(1, f"init {os.readlink('/proc/self')}\n".encode())
    build_root()
    # backstop should the harness die: an item never outlives its time limits
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(alarm)
    child = os.fork()
    if child == 0:
        start_program()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the program alone holds the stdin and result pipes
    while True:
        pid, status = os.waitpid(-1, 0)  # as PID 1, reap orphans too
        if pid == child:
            break
    # any normal exit of the program is 0 here: only the wrapper's report says it reached the end
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)
