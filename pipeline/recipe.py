"""Recipe: a YAML file naming a base model, calibration data, an eval suite and the variants.

Validation happens in two steps, both before any quantization or evaluation starts:
`load_recipe` checks the file's structure and every stage's parameters; `check_against_model`
checks what depends on the model itself (e.g. that group_size divides every layer width).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import QuantpipeError, RecipeError
from .gate import GateConfig
from .stages.registry import get_stage

EVALS_DIR = Path(__file__).resolve().parent.parent / "evals"
MAX_NAME = 64
# names in a run folder besides the rows' folders
RESERVED = {"report", "run.lock", "recipe.json", "plan.json", "stages", "eval", "kl"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    id: str = Field(description="hub id (org/name), local path, or builtin:<name>")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="allow Python shipped in the model folder (auto_map) to run")


class CalibrationSpec(Strict):
    dataset: str = Field("builtin:python-docs", description="hub id, local .txt/.jsonl file, or builtin:python-docs")
    split: str = "train"
    text_field: str = "text"
    num_samples: int = Field(64, gt=0, le=100_000)
    seq_len: int = Field(256, ge=16, le=131_072)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class TaskSpec(Strict):
    limit: int | None = Field(None, gt=0, le=10_000_000, description="first N items (per subject for MMLU)")
    samples: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="explicit item indices (not for groups)")
    num_fewshot: int | None = Field(None, ge=0)
    max_gen_toks: int | None = Field(None, gt=0)


# vLLM's kv_cache_dtype values (vllm.config.CacheDType); a TurboQuant row's own preset comes from its stage
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")
# lm-eval VLLM arguments quantpipe sets itself (the artifact, the recipe's dtype, seeds, batch size)
VLLM_RESERVED = {"pretrained", "dtype", "batch_size", "seed", "max_length", "trust_remote_code", "revision", "tokenizer", "device"}


class VLLMSpec(Strict):
    """`eval.vllm`: lm-eval's VLLM arguments for rows evaluated on vLLM (eval.engine: vllm)."""

    tensor_parallel_size: int = Field(1, ge=1, le=256, description="GPUs one engine's weights are split across")
    pipeline_parallel_size: int = Field(1, ge=1, le=256, description="pipeline stages of one engine (GPUs = TP x PP)")
    data_parallel_size: int = Field(1, ge=1, le=256, description="engine replicas, each TP x PP GPUs (lm-eval then batches auto)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM reserves (weights + KV cache)")
    max_model_len: int | None = Field(None, ge=16, le=1 << 22, description="context length; default: the evaluation's (4096)")
    max_num_seqs: int | None = Field(None, ge=1, le=1 << 20, description="sequences per scheduler step; default: vLLM's")
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field("auto", description="KV cache storage (a TurboQuant row's preset wins for it)")
    enable_prefix_caching: bool | None = Field(None, description="default: vLLM's (on)")
    kl: Literal["default_engine", "none"] = Field(
        "default_engine",
        description="vLLM rows' KL entry: default_engine: computed by the default engine's backend for the row's format "
        "(vLLM gives no full distributions); none: no KL for vLLM rows",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="any other lm-eval VLLM / vllm.LLM keyword argument")

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        import json

        for k, x in v.items():
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", k):
                raise ValueError(f"{k!r} is not a keyword argument name")
            if k in cls.model_fields:
                raise ValueError(f"{k}: set it as eval.vllm.{k}, not under extra")
            if k in VLLM_RESERVED:
                raise ValueError(f"{k}: quantpipe sets it (from the artifact and the recipe)")
            try:
                json.dumps(x, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{k}: not a plain YAML value ({e})") from e
        return v

    def gpus(self) -> int:
        """GPUs one row's evaluation holds, all on one node."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def engine_args(self) -> dict[str, Any]:
        """What enters a vLLM row's result keys: every engine argument (kl only routes the KL steps)."""
        return self.model_dump(mode="json", exclude={"kl"})


class EvalSpec(Strict):
    suite: str = Field("full", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a suite name under evals/suites")
    batch_size: int | Literal["auto"] | None = Field(
        None,
        description="same for every row; defaults to the suite's. auto: the largest batch whose measured peak memory "
        "fits memory_budget_gib (resolved per row when its model loads, recorded in each evaluation's record)",
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        le=1 << 20,
        description="batch_size auto: peak resident memory of the evaluating process, weights included, GiB "
        "(on a GPU: allocated GPU memory); default: what is resident plus 80% of what is available",
    )
    data_dir: str | None = Field(None, description="local copies of the datasets (offline); relative to the recipe file")
    engine: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="default: transformers/GPTQModel/llama.cpp in process; vllm: vLLM on a GPU (GGUF stays llama.cpp); "
        "or the engine a plug-in backend declares",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="default engine: where rows are evaluated. auto: CUDA when torch sees a GPU, else CPU (placement.py)"
    )
    max_memory: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(gt=0)]] | None = Field(
        None, description="on CUDA: GiB each GPU (by index) may hold of a row's weights, e.g. {0: 70, 1: 70}; default: accelerate's"
    )
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="engine arguments of rows evaluated on vLLM")
    tasks: dict[str, TaskSpec | None] = Field(default_factory=dict)
    order: Literal["first_n", "random"] = Field(
        "first_n",
        description="first_n: each task's first items (stock lm-eval, comparable with published numbers); "
        "random: a seeded random permutation of the full split (MMLU stratified per subject), evaluated in chunks, "
        "so any prefix is a random sample and a larger budget extends a smaller one. With random, `limit` is the "
        "task's item budget (all of MMLU, not per subject)",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random item order")
    chunk_items: int = Field(100, ge=10, le=10_000, description="random order: items per stored chunk (the first round)")
    round_growth: float = Field(
        1.5,
        ge=1.1,
        le=4,
        description="sequential rounds: each round's cumulative items grow by "
        "this factor (rounded up to whole chunks), so a row's model is loaded O(log n) times",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        # one message for every bad value (pydantic's would list each member of the union)
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)  # as the plain int field accepted before
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"{v!r} is not a positive integer or 'auto'")

    @model_validator(mode="after")
    def _budget(self) -> EvalSpec:
        if self.memory_budget_gib is not None and self.batch_size != "auto":
            raise ValueError("memory_budget_gib applies only to batch_size: auto")
        if self.max_memory and self.device == "cpu":
            raise ValueError("max_memory caps GPU memory; it does not apply with device: cpu")
        if self.vllm.data_parallel_size > 1 and self.batch_size not in (None, "auto"):
            # lm-eval's VLLM switches to auto batching with data parallelism: the key would name a batch never used
            raise ValueError("vllm.data_parallel_size > 1 batches automatically; set batch_size: auto or leave it out")
        return self


class TaskResources(Strict):
    """What one Ray task declares (used only with `--executor ray`)."""

    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_gb: float | None = Field(None, gt=0)

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * 2**30)
        return opts


class Resources(Strict):
    build: TaskResources = Field(default_factory=TaskResources, description="one variant's stage chain")
    evaluate: TaskResources = Field(default_factory=TaskResources, description="one (row, benchmark) evaluation")


class StageSpec(BaseModel):
    """One link of a variant's chain: `stage` names a registered stage; other keys are its params."""

    model_config = ConfigDict(extra="allow")
    stage: str

    def params_dict(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(Strict):
    name: str
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    variants: dict[str, list[StageSpec]]
    offline: bool = False
    gate: GateConfig | None = None
    resources: Resources = Field(default_factory=Resources)
    source: Path | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        if len(v) > MAX_NAME:
            raise ValueError(f"at most {MAX_NAME} characters (it names a folder)")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict) -> dict:
        if not v:
            raise ValueError("add at least one variant, e.g. fp8: [{stage: fp8}]")
        for name, chain in v.items():
            if name == "base":
                raise ValueError("'base' is reserved for the unquantized model's row")
            if name in RESERVED:
                raise ValueError(f"variant name '{name}' is reserved (the run folder has a file or folder of that name)")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
                raise ValueError(f"variant name '{name}': use letters, digits, '.', '_', '+' and '-'")
            if len(name) > MAX_NAME:
                raise ValueError(f"variant name '{name[:20]}...': at most {MAX_NAME} characters (it names folders and files)")
            if not chain:
                raise ValueError(f"variant '{name}' has no stages")
        return v

    def data_dir(self) -> Path | None:
        if self.eval.data_dir is None:
            return None
        p = Path(self.eval.data_dir).expanduser()
        if not p.is_absolute() and self.source is not None:
            p = self.source.parent / p
        return p.resolve()

    def stages(self, variant: str):
        """Instantiate the variant's stages (already validated by load_recipe)."""
        return [get_stage(s.stage)(get_stage(s.stage).Params.model_validate(s.params_dict())) for s in self.variants[variant]]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(prefix: str, err: ValidationError) -> RecipeError:
    e = err.errors()[0]
    where = _loc(tuple(e["loc"]))
    field = f"{prefix}.{where}" if prefix and where else (prefix or where or "<top>")
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif e["type"] == "missing":
        msg = "required but missing"
    return RecipeError(field, msg)


def parse_recipe(data: Any, source: Path | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("<top>", f"expected a mapping of recipe fields, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _first_error("", e) from e
    recipe.source = source
    for vname, chain in recipe.variants.items():
        fmt = "hf"
        for i, spec in enumerate(chain):
            field = f"variants.{vname}[{i}]"
            try:
                cls = get_stage(spec.stage)
            except QuantpipeError as e:
                raise RecipeError(f"{field}.stage", str(e)) from e
            try:
                stage = cls(cls.Params.model_validate(spec.params_dict()))
            except ValidationError as e:
                raise _first_error(field, e) from e
            if fmt not in stage.accepts:
                raise RecipeError(
                    f"{field}.stage",
                    f"stage '{spec.stage}' takes {'/'.join(stage.accepts)} input, but the previous stage "
                    f"produces '{fmt}'; reorder the chain",
                )
            fmt = stage.output_format(fmt)
    from .calibration import refuse_evaluation_data

    refuse_evaluation_data(recipe)
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """YAML for recipes and suites: no duplicate keys (the last one would silently win) and no
    aliases (a handful of nested aliases expands to billions of nodes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*name) are not allowed{self.peek_event().start_mark}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key '{key}'{key_node.start_mark}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_FILE = 1 << 20  # a recipe or suite is a page of YAML, not megabytes


def read_yaml(path: Path, what: str):
    if path.stat().st_size > MAX_FILE:
        raise QuantpipeError(f"{what} {path} is over {MAX_FILE >> 20} MiB; not a recipe")
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as e:
        raise QuantpipeError(f"{what} {path} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise QuantpipeError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from e


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QuantpipeError(f"recipe file not found: {path}")
    return parse_recipe(read_yaml(path, "recipe"), source=path.resolve())


def check_against_model(recipe: Recipe, info) -> None:
    """Model-dependent checks (group sizes, head dims...), still before any work."""
    for vname in recipe.variants:
        for i, stage in enumerate(recipe.stages(vname)):
            try:
                stage.check(info)
            except ValueError as e:
                raise RecipeError(f"variants.{vname}[{i}]", str(e)) from e


def load_suite(name: str) -> dict:
    path = EVALS_DIR / "suites" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (EVALS_DIR / "suites").glob("*.yaml"))
        raise RecipeError("eval.suite", f"no suite '{name}' in evals/suites (known: {', '.join(known)})")
    suite = read_yaml(path, "suite")
    if not isinstance(suite, dict) or not isinstance(suite.get("tasks") or {}, dict):
        raise RecipeError("eval.suite", f"{path} is not a suite (a mapping with a `tasks:` mapping)")
    return suite
