# quantpipe sandbox wrapper
# Runs in the sandbox's interpreter as the program's process: reads "token" and the source from
# stdin, points fds 0-2 at /dev/null, runs the source as __main__ and reports on a private copy of
# the stdout pipe. A report can only come from here, after the program returned. code_exec.py
# passes this file's text to `python -I -B -c` (the new root no longer shows this package).
# Standard library only: it runs under whichever interpreter the sandbox picks.


def run():
    import os
    import sys
    import types

    me = os.getpid()
    head, _, source = sys.stdin.buffer.read().partition(b"\n")
    token = head.decode()
    report, write, exit_ = os.dup(1), os.write, os._exit  # os.dup: not inherited by what the program execs
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    write(report, f"\n{token} started\n".encode())
    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    sys.modules["__main__"] = main
    reason = "passed"
    try:
        exec(compile(source, "program.py", "exec"), main.__dict__)
    except SystemExit:
        reason = "exit before end"
    except MemoryError:
        main.__dict__.clear()
        reason = "killed: memory"
    except BaseException as e:  # noqa: BLE001 - whatever the program raised is its result
        try:
            detail = " ".join(str(e).split())[:200]
        except BaseException:  # noqa: BLE001 - an exception whose str() raises: no detail
            detail = ""
        kind = "assertion failed" if isinstance(e, AssertionError) else f"exception: {type(e).__name__}"
        reason = f"{kind}: {detail}" if detail else kind
    if os.getpid() == me:  # a forked copy that got here did not run the main process to its end
        write(report, f"\n{token} {reason}\n".encode(errors="replace"))
    exit_(0)


if __name__ == "__main__":
    run()
