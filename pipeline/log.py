"""What a command prints: one line per plan step by default, third-party noise filtered, everything at -v.

Results (tables, build lines) go to standard output; quantpipe's own lines to standard error.
Libraries print to both (GPTQModel, llm-compressor, torch, llama.cpp's converter, C extensions), at
import and while they run, in this process and in child processes. So while a command runs, file
descriptors 1 and 2 point at a log file (or, with -v, both at standard error), and quantpipe writes
its results and its lines to saved copies of the real standard output and error: a program reading
`quantpipe build`'s output sees only results, and a person sees only quantpipe's lines. Nothing is
lost: the log file keeps every third-party line and any traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("quantpipe")

# Loggers whose INFO/WARNING lines are noise at the default verbosity (shown with -v).
NOISY = (
    "lm-eval",
    "lm_eval",
    "transformers",
    "torchao",
    "torch",
    "gptqmodel",
    "llmcompressor",
    "compressed_tensors",
    "datasets",
    "accelerate",
    "huggingface_hub",
    "urllib3",
    "filelock",
    "ray",
    "numexpr",
    "httpx",
)

_results = None
_messages = None
log_path: Path | None = None


def setup(verbosity: int = 0) -> None:
    """verbosity: -1 warnings and errors only, 0 one line per step, 1 everything (third parties too)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(messages())
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity < 1 else "%(levelname).1s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.WARNING)
    log.setLevel(level)
    if verbosity < 1:
        quiet_third_party()


def quiet_third_party() -> None:
    """Before the heavy imports: their import-time messages and progress bars are not for users."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # libraries pass disable=False explicitly, which TQDM_DISABLE does not override
        import tqdm.std

        init = tqdm.std.tqdm.__init__
        if not getattr(init, "_quantpipe_quiet", False):

            def quiet_init(self, *args, **kwargs):
                kwargs["disable"] = True
                init(self, *args, **kwargs)

            quiet_init._quantpipe_quiet = True
            tqdm.std.tqdm.__init__ = quiet_init
    except ImportError:
        pass
    try:  # llm-compressor logs through loguru
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="ERROR")
    except ImportError:
        pass


def _log_file() -> Path:
    folder = Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("*.log"))[:-19]:  # keep the last 20
        old.unlink(missing_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def capture_output(verbosity: int = 0) -> None:
    """Keep the real stdout/stderr for results and quantpipe's lines; send fds 1 and 2 (everything
    else, child processes included) to a log file, or with -v to standard error."""
    global _results, _messages, log_path
    if _results is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _results = os.fdopen(os.dup(1), "w", buffering=1)
    _messages = os.fdopen(os.dup(2), "w", buffering=1)
    if verbosity >= 1:
        os.dup2(2, 1)
    else:
        try:
            log_path = _log_file()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:  # no writable home: third-party output stays on standard error
            os.dup2(2, 1)
        else:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(_messages)


def results():
    """Where results go: the real standard output."""
    return _results or sys.stdout


def messages():
    """Where quantpipe's own lines go: the real standard error."""
    return _messages or sys.stderr
