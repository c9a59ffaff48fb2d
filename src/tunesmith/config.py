"""Typed run configuration: YAML plus ``--set a.b=value`` overrides resolve to one ``RunConfig``.

Each layer declares its own option groups (``data/options.py``, ``train/options.py``, each method's
and each objective's ``Options``); this module assembles them, with the ``method:`` and
``objective:`` sections as unions tagged by ``name``, built from the registries. Every invalid field
is reported at once, with its dotted path, as a ``TunesmithError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from tunesmith.data.options import DataConfig
from tunesmith.errors import TunesmithError
from tunesmith.eval.decision import METRICS as DECISION_METRICS
from tunesmith.eval.decision import RULES
from tunesmith.eval.general import GeneralConfig
from tunesmith.methods import REGISTRY as METHODS
from tunesmith.methods.base import no_load_kwargs
from tunesmith.objectives import REGISTRY as OBJECTIVES
from tunesmith.objectives import lacks
from tunesmith.options import Section
from tunesmith.privacy.options import PrivacyConfig
from tunesmith.privacy.options import check as check_privacy
from tunesmith.train.distributed import launched_sharding, sharding_problems
from tunesmith.train.options import TrainConfig

DEFAULT_METHOD = "lora"
DEFAULT_OBJECTIVE = "causal"


def _union(options: list[type[Section]]):
    return Annotated[Union[tuple(options)], Field(discriminator="name")]  # noqa: UP007 (built at run time)


MethodOptions = _union([m.options for m in METHODS.values()])
ObjectiveOptions = _union([o.Options for o in OBJECTIVES.values()])
# The sections whose options depend on their ``name``: (section, registry of option classes, what).
TAGGED = {"method": ({n: m.options for n, m in METHODS.items()}, "method"),
          "objective": ({n: o.Options for n, o in OBJECTIVES.items()}, "objective")}


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="Alias, local HF directory, GGUF file or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"


class EvalConfig(Section):
    max_examples: int | None = Field(None, ge=1, description="Cap on test examples scored.")
    samples: int = Field(3, ge=0, description="Generated samples shown in the report.")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    general: GeneralConfig | None = Field(None, description="Probes of general ability (forgetting); causal LMs.")
    judge: str | None = Field(
        None, description="Judged evaluation at the end of training: the run directory of a reward model or "
        "classifier that scores answers of the tuned and the base model. Relative to the config file."
    )
    judge_label: str = Field("positive", description="With a classifier judge: the label whose log-odds is the score.")
    decision: Literal[RULES] = Field(
        "argmax", description="Label data: how a label is chosen from the probabilities. argmax: the most probable; "
        "prior: divided by the training prior to a strength chosen on validation; threshold: the threshold (two "
        "labels) or per-label offsets that maximise eval.decision_metric on validation. Chosen after training, "
        "kept in the run (decision.json), applied by eval and predict."
    )
    decision_metric: Literal[tuple(DECISION_METRICS)] = Field(
        "macro_f1", description="What eval.decision maximises on the validation split."
    )


class OutputConfig(Section):
    dir: str = "runs/run"
    merge: bool = False


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    objective: ObjectiveOptions = Field(default_factory=lambda: OBJECTIVES[DEFAULT_OBJECTIVE].Options())
    data: DataConfig
    method: MethodOptions = Field(default_factory=lambda: METHODS[DEFAULT_METHOD].options())
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    privacy: PrivacyConfig | None = None
    # `tunesmith search` reads and checks this section (search/space.py); every other command trains or
    # reads the config around it, so that a search config is also the config of its base run.
    search: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_aliases(cls, raw):
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        model = raw.get("model")
        # `model.task` named the objective before objectives had options of their own; runs saved
        # then, and configs written for them, still load.
        if isinstance(model, dict) and "task" in model:
            model = dict(model)
            task = model.pop("task")
            raw["model"] = model
            objective = raw.get("objective")
            if objective is None:
                raw["objective"] = {"name": task}
            elif isinstance(objective, dict) and objective.get("name", task) != task:
                raise ValueError(f"model.task {task!r} and objective.name {objective.get('name')!r} disagree; "
                                 "give objective.name only")
        for section, default in (("method", DEFAULT_METHOD), ("objective", DEFAULT_OBJECTIVE)):
            if isinstance(raw.get(section), dict) and "name" not in raw[section]:
                raw[section] = {"name": default, **raw[section]}
        return raw


def _parse_value(text: str) -> Any:
    # YAML scalars give the types users expect from --set: 3 -> int, 1e-4 -> float, true -> bool.
    value = yaml.safe_load(text)
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict, creating sections as needed."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key.sub=value")
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = child
        else:
            try:
                node[leaf] = _parse_value(value)
            except yaml.YAMLError as err:
                problems.append(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                                "quote it to pass text")
    if problems:
        raise TunesmithError(*problems)
    return raw


def format_validation_error(err: ValidationError, source: str, tagged: dict | None = None) -> list[str]:
    """One line per invalid field: ``config.yaml: train.lr: Input should be greater than 0``.

    ``tagged`` adds unions tagged by ``name`` deeper in the config, by their path (``"*"`` for a list
    index): ``{("grpo", "rewards", "*"): (options by name, what)}``."""
    unions = {(section,): entry for section, entry in TAGGED.items()} | (tagged or {})
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        options, what, at = {}, None, 0
        for n in range(len(loc), 0, -1):
            key = tuple("*" if isinstance(p, int) else p for p in loc[:n])
            if key in unions:
                (options, what), at = unions[key], n
                break
        # pydantic puts the union member's tag in the path (method.prefix.r); the user wrote method.r.
        tag = loc.pop(at) if at and len(loc) > at and loc[at] in options else None
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":
            path += ".name"
            msg = f"unknown {what} {e['ctx']['tag']!r}; known: {', '.join(options)}"
        elif e["type"] == "union_tag_not_found":
            path += ".name"
            msg = f"give the {what}: one of {', '.join(options)}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
            if tag:
                takes = [f for f in options[tag].model_fields if f != "name"]
                msg += f"; {what} {tag} takes " + (", ".join(takes) if takes else "no options")
        lines.append(f"{source}: {path}: {msg}")
    return lines

# The features of a run that need an ability of its objective (``objectives.ABILITIES``): checked
# here, once, for every command that loads a config.
NEEDS = (
    ("eval.judge", lambda c: c.eval.judge, "causal_answers"),
    ("eval.general", lambda c: c.eval.general, "causal_answers"),
    ("data.sources", lambda c: c.data.sources, "mixes_sources"),
    ("eval.decision", lambda c: c.eval.decision != "argmax", "scores_labels"),
)


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    problems = []
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += format_validation_error(err, source)
        config = None
    # The method's and objective's own checks run even when other sections are invalid, so that
    # every problem shows at once.
    method = config.method if config else _section_alone(raw, "method", MethodOptions, DEFAULT_METHOD)
    objective = config.objective if config else _section_alone(raw, "objective", ObjectiveOptions,
                                                               DEFAULT_OBJECTIVE)
    if method is not None:
        problems += [f"{source}: {p}" for p in METHODS[method.name].check(method)]
        if objective is not None:
            problems += [f"{source}: {p}" for p in OBJECTIVES[objective.name].check_method(METHODS[method.name])]
    privacy, train = (config.privacy, config.train) if config else (
        _section_value(raw.get("privacy"), PrivacyConfig), _section_value(raw.get("train") or {}, TrainConfig))
    if privacy is not None and train is not None and method is not None:
        problems += [f"{source}: {p}" for p in check_privacy(privacy, train, METHODS[method.name])]
    if config:
        # Under `accelerate launch` with FSDP or DeepSpeed, what cannot train sharded is refused here.
        method = METHODS[config.method.name]
        problems += [f"{source}: {p}" for p in sharding_problems(
            launched_sharding(), method.name, method.load_kwargs is not no_load_kwargs, config.privacy is not None)]
        problems += [f"{source}: {field}: {why}" for field, wanted, ability in NEEDS
                     if wanted(config) and (why := lacks(config.objective.name, ability))]
    if problems:
        raise TunesmithError(*problems)
    return config


def _section_alone(raw: dict, section: str, union, default: str):
    value = raw.get(section) or {}
    if isinstance(value, dict) and "name" not in value:
        value = {"name": default, **value}
    try:
        return TypeAdapter(union).validate_python(value)
    except ValidationError:
        return None  # its problems are already reported


def _section_value(value, options: type[Section]) -> Section | None:
    if value is None:
        return None
    try:
        return options.model_validate(value)
    except ValidationError:
        return None  # its problems are already reported


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file, before overrides and validation."""
    path = Path(path)
    if path.is_dir():
        raise TunesmithError(f"{path}: a directory; give a config file in it")
    if not path.is_file():
        raise TunesmithError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise TunesmithError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: expected a mapping of sections (model, data, method, train, ...)")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, raw: dict | None = None) -> RunConfig:
    """Read a YAML config (or take its ``raw`` mapping), apply overrides, validate, and resolve
    relative data paths."""
    raw = read_config_file(path) if raw is None else raw
    config = validate_config(apply_overrides(raw, overrides or []), str(path))
    return _resolve_paths(config, Path(path).parent)


def with_method(raw: dict, name: str) -> dict:
    """``raw`` with its method switched to ``name``, keeping the method options that ``name`` takes
    (so that one config can be compared across methods)."""
    takes = METHODS[name].options.model_fields if name in METHODS else {}
    section = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    return {**raw, "method": {**{k: v for k, v in section.items() if k in takes}, "name": name}}


def _resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    # Data paths in a config are relative to the config file, like includes in most tools;
    # "builtin:" names bundled data sets and is resolved by the data layer.
    data = config.data
    for field in ("path", "train", "validation", "test"):
        setattr(data, field, relative_to(base, getattr(data, field)))
    for source in data.sources or []:
        source.path = relative_to(base, source.path)
    config.eval.judge = relative_to(base, config.eval.judge)
    return config


def relative_to(base: Path, value: str | None) -> str | None:
    """``value`` read from the config file's folder ``base``, unless it only exists from the working directory."""
    if not value or value.startswith("builtin:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() or not Path(value).exists() else value


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
