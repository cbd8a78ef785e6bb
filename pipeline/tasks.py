"""Every benchmark quantpipe evaluates, declared once: adding one is an entry here.

A `Dataset` is a hub dataset and the layout of its local copy (what `--data-dir` mirrors and
what calibration may never use). A `Task` is one of lm-eval's stock tasks on a dataset: the
stock files to copy, and, when it is a column of the table, its headline metric.
"""

from __future__ import annotations

from dataclasses import dataclass

# lm-eval's seeds, the same for every row and engine (they enter every evaluation's key)
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass(frozen=True)
class Dataset:
    hub_id: str
    folder: str  # under the data directory
    # config -> split -> file under `folder`; None: MMLU's one file for all subjects, split per subject
    configs: dict[str, dict[str, str]] | None
    # other names of the same data, refused as calibration sets (lower-case)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Column:
    name: str  # the table's column
    metric: str
    filter: str
    label: str  # the table footer's description of the score


@dataclass(frozen=True)
class Task:
    name: str  # lm-eval task or group
    dataset: Dataset
    stock_files: tuple[str, ...]  # relative to lm_eval/tasks; the first names the family folder
    column: Column | None = None  # None: evaluated, stored, but not a table column
    runs_code: bool = False  # executes model-written programs (needs the opt-in)
    group: bool = False  # a group of per-subject subtasks (items are stratified per subtask)
    # items in the stock task's evaluation split: what more items can buy (a design needing more cannot decide)
    size: int | None = None


MMLU_DATA = Dataset("cais/mmlu", "mmlu", None, aliases=("hendrycks_test",))
MMLU_REDUX = Dataset("edinburgh-dawg/mmlu-redux", "mmlu_redux", None, aliases=("edinburgh-dawg/mmlu-redux-2.0",))
GSM8K_DATA = Dataset("openai/gsm8k", "gsm8k", {"main": {"train": "train.jsonl", "test": "test.jsonl"}}, aliases=("gsm8k",))
HUMANEVAL_DATA = Dataset(
    "openai/openai_humaneval", "humaneval", {"openai_humaneval": {"test": "test.jsonl"}}, aliases=("openai_humaneval",)
)
TRUTHFULQA_DATA = Dataset(
    "truthfulqa/truthful_qa",
    "truthfulqa",
    {
        "generation": {"validation": "generation/validation.jsonl"},
        "multiple_choice": {"validation": "multiple_choice/validation.jsonl"},
    },
    aliases=("truthful_qa",),
)

# Datasets mirrored from --data-dir (MMLU-Redux is not evaluated, only kept out of calibration).
MIRRORED = (MMLU_DATA, GSM8K_DATA, HUMANEVAL_DATA, TRUTHFULQA_DATA)
EVALUATION_DATA = (*MIRRORED, MMLU_REDUX)

_TQA = ("truthfulqa/truthfulqa_mc1.yaml", "truthfulqa/utils.py")

# In the Section 7 column order.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "mmlu",
            MMLU_DATA,
            ("mmlu/default/*.yaml", "mmlu/default/_default_template_yaml"),
            Column("MMLU", "acc", "none", "acc"),
            group=True,
            size=14042,  # the test split of its 57 subjects
        ),
        Task(
            "humaneval",
            HUMANEVAL_DATA,
            ("humaneval/humaneval.yaml",),
            Column("HumanEval", "pass@1", "create_test", "pass@1 (greedy)"),
            runs_code=True,
            size=164,
        ),
        Task(
            "gsm8k",
            GSM8K_DATA,
            ("gsm8k/gsm8k.yaml",),
            Column("GSM8K", "exact_match", "flexible-extract", "exact match, flexible-extract"),
            size=1319,
        ),
        Task("truthfulqa_mc1", TRUTHFULQA_DATA, _TQA, size=817),
        Task(
            "truthfulqa_mc2",
            TRUTHFULQA_DATA,
            (*_TQA[:1], "truthfulqa/truthfulqa_mc2.yaml", _TQA[1]),
            Column("TruthfulQA", "acc", "none", "MC2"),
            size=817,
        ),
    )
}

COLUMNS: tuple[Task, ...] = tuple(t for t in TASKS.values() if t.column)
# table column -> items its benchmark has (what more items can buy a check on it)
COLUMN_SIZES: dict[str, int | None] = {t.column.name: t.size for t in COLUMNS}


def refused_calibration_ids() -> set[str]:
    return {name.lower() for d in EVALUATION_DATA for name in (d.hub_id, *d.aliases)}


def evaluation_folders() -> set[str]:
    return {d.folder for d in EVALUATION_DATA}


def item_scores(samples: list[dict], task: Task) -> dict[str, float]:
    """Per-item headline metric keyed by '<subtask>/<doc_hash or doc_id>' (paired across rows)."""
    col, out = task.column, {}
    for s in samples:
        if s.get("filter", "none") != col.filter or col.metric not in s:
            continue
        key = f"{s['task']}/{s.get('doc_hash') or s['doc_id']}"
        v = s[col.metric]
        v = v[0] if isinstance(v, list) else v
        out[key] = float("nan") if v is None else float(v)  # null: a non-finite score, stored as strict JSON
    return out
