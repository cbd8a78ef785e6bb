"""No third-party code from a model folder runs unless the recipe opts in (`model.trust_remote_code`).

A model folder can ship Python (`auto_map` in its config or tokenizer config) that transformers
imports when a caller passes trust_remote_code=True. quantpipe's own loaders pass it only with the
opt-in, but tools it runs do not ask: llama.cpp's GGUF converter passes True for several
architectures, and so does GPTQModel for some. `guard()` closes the one door all of them go
through — transformers' import of a folder's module (dynamic_module_utils.get_class_in_module) —
in this process and, through the converter's wrapper, in its subprocess.
"""

from __future__ import annotations

import os

ENV = "QUANTPIPE_TRUST_REMOTE_CODE"


class RemoteCodeRefused(RuntimeError):
    pass


def allow(yes: bool) -> None:
    """Record the recipe's choice where child processes (converter, Ray workers) see it too."""
    os.environ[ENV] = "1" if yes else "0"


def allowed() -> bool:
    return os.environ.get(ENV) == "1"


def trust() -> dict:
    """from_pretrained keyword arguments for quantpipe's own loaders."""
    return {"trust_remote_code": True} if allowed() else {}


def guard() -> None:
    """Refuse to import a model folder's own code unless allowed (idempotent)."""
    import transformers.dynamic_module_utils as dm

    original = dm.get_class_in_module
    if getattr(original, "_quantpipe_guard", False):
        return

    def guarded(class_name, module_path, *args, **kwargs):
        if not allowed():
            raise RemoteCodeRefused(
                f"the model folder asks to run its own code ({module_path}: {class_name}); quantpipe runs no code from "
                "a model folder unless the recipe sets model.trust_remote_code: true"
            )
        return original(class_name, module_path, *args, **kwargs)

    guarded._quantpipe_guard = True
    dm.get_class_in_module = guarded
