"""What a command prints: one line per plan step by default, third-party noise filtered, everything at -v.

Results (tables, build lines) go to standard output; everything else to standard error. Libraries
print to standard output too (GPTQModel, llama.cpp's converter, C extensions), so while a command
runs, file descriptor 1 points at standard error and results are written to a saved copy of the
real standard output (`results()`): a program reading `quantpipe build`'s output sees only results.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

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


def setup(verbosity: int = 0) -> None:
    """verbosity: -1 warnings and errors only, 0 one line per step, 1 everything (third parties too)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
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


def capture_stdout() -> None:
    """Point fd 1 at standard error for the rest of the process; `results()` is the real stdout."""
    global _results
    if _results is not None:
        return
    sys.stdout.flush()
    _results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)


def results():
    """Where results go: the real standard output."""
    return _results or sys.stdout
