"""Local mirrors of the evaluation datasets, laid out like their hub repos.

lm-eval's stock tasks call datasets.load_dataset(dataset_path, dataset_name). Pointing
dataset_path at a folder whose README front matter lists the same configs and splits as the
hub repo makes the stock tasks run unchanged and offline. The mirror lives in the user cache
(never in the project); files that need no reshaping are symlinks to the data directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import yaml

from .errors import QuantpipeError
from .tasks import MIRRORED


def required_files(data_dir: Path) -> list[Path]:
    """Every file build_mirrors reads (MMLU: one test and one dev file for all subjects)."""
    out = []
    for d in MIRRORED:
        splits = d.configs or {"all": {"test": "test.jsonl", "dev": "dev.jsonl"}}
        out += [Path(data_dir) / d.folder / rel for cfg in splits.values() for rel in cfg.values()]
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("QUANTPIPE_HOME", Path.home() / ".cache" / "quantpipe")) / "datasets"


def _need(path: Path) -> Path:
    """An existing data file every line of which is a JSON object (a garbled line fails here, named,
    before any work, not inside lm-eval at the first row)."""
    if not path.is_file():
        raise QuantpipeError(f"dataset file missing: {path} (check --data-dir / eval.data_dir)")
    n = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):  # noqa: B007 - n names the bad line below
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise QuantpipeError(f"{path}:{n} is not a JSON object per line ({type(e).__name__})") from e
    return path


def _write_readme(folder: Path, configs: dict[str, dict[str, str]]) -> None:
    front = {
        "configs": [
            {"config_name": name, "data_files": [{"split": s, "path": p} for s, p in splits.items()]} for name, splits in configs.items()
        ]
    }
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n")


def _mirror_mmlu(src: Path, dest: Path) -> None:
    by_split: dict[str, dict[str, list[str]]] = {}
    for split in ("test", "dev"):
        rows = defaultdict(list)
        for n, line in enumerate(_need(src / f"{split}.jsonl").read_text().split("\n"), 1):
            if line.strip():
                try:
                    rows[json.loads(line)["subject"]].append(line)
                except (ValueError, KeyError) as e:
                    raise QuantpipeError(f"{src / f'{split}.jsonl'}:{n} is not an MMLU row with a 'subject'") from e
        by_split[split] = rows
    configs = {}
    for subject in sorted(by_split["test"]):
        (dest / subject).mkdir(parents=True, exist_ok=True)
        configs[subject] = {}
        for split, rows in by_split.items():
            (dest / subject / f"{split}.jsonl").write_text("\n".join(rows.get(subject, [])) + "\n")
            configs[subject][split] = f"{subject}/{split}.jsonl"
    _write_readme(dest, configs)


def build_mirrors(data_dir: Path) -> dict[str, Path]:
    """hub id -> local folder. Rebuilt when any source file changes (size or mtime)."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise QuantpipeError(f"data directory not found: {data_dir}")
    h = hashlib.sha256(str(data_dir).encode())
    for f in sorted(data_dir.rglob("*.jsonl")):
        st = f.stat()
        h.update(f"{f.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = _cache_root() / h.hexdigest()[:16]
    out = {d.hub_id: root / d.folder for d in MIRRORED}
    if (root / ".complete").exists():
        return out
    for d in MIRRORED:
        dest = root / d.folder
        dest.mkdir(parents=True, exist_ok=True)
        if d.configs is None:
            _mirror_mmlu(data_dir / d.folder, dest)
            continue
        for splits in d.configs.values():
            for rel in splits.values():
                link = dest / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(_need(data_dir / d.folder / rel))
        _write_readme(dest, d.configs)
    (root / ".complete").write_text("")
    return out
