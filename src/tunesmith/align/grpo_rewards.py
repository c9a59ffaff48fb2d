"""GRPO's rewards: each entry of ``grpo.rewards`` scores every answer, and an answer's reward is the
sum of the entries' scores times their weights.

One entry per kind, tagged by ``name``, each an options class with its own checks and a ``build``
that makes its scorer (``REWARDS``):

- ``function``: a Python function named ``module:function`` (an importable module) or
  ``path/to/file.py:function`` (relative to the config file), called as ``function(prompt, answer,
  row)`` for each answer, returning a number. ``row`` is the prompt's row of the prompts file.
- ``exact``: 1 when the answer (or one field of it, read as JSON) equals a column of the row, else 0.
- ``regex``: 1 when the pattern is found in the answer, else 0.
- ``json_schema``: 1 when the answer is JSON that fits the schema, else 0.
- ``run``: a classifier or reward-model run's score (``align/rewards.py``, PPO's reward).

The ``jsonschema`` package is not a dependency: ``json_schema`` checks a subset of JSON Schema
(``SCHEMA_KEYWORDS``), and a schema with any other keyword is refused when the config is loaded, so
that no keyword is silently ignored.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field, field_validator

from tunesmith.config import relative_to
from tunesmith.errors import TunesmithError
from tunesmith.options import Section

# (prompts, answers, rows) -> one score per answer
Scorer = Callable[[list[str], list[str], list[dict]], list[float]]


class FunctionReward(Section):
    name: Literal["function"]
    function: str = Field(..., description="module:function, or path/to/file.py:function (relative to the config)")
    weight: float = 1.0

    @field_validator("function")
    @classmethod
    def _has_colon(cls, value: str) -> str:
        if value.count(":") != 1 or not all(value.split(":")):
            raise ValueError("give it as module:function or path/to/file.py:function")
        return value

    def build(self, device, field: str) -> Scorer:
        function = import_function(self.function)

        def score(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
            return [_number(function(p, a, r), self.function) for p, a, r in zip(prompts, answers, rows)]

        return score


class ExactReward(Section):
    name: Literal["exact"]
    column: str = Field(..., description="The column of the prompts file that holds the expected answer.")
    json_field: str | None = Field(None, description="Compare this field of the answer read as JSON, not the answer.")
    label_map: dict[str, str] = Field(
        default_factory=dict, description="The expected answer for a column value, e.g. {fresh: positive}."
    )
    ignore_case: bool = False
    weight: float = 1.0

    def build(self, device, field: str) -> Scorer:
        def score(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
            return [float(self.matches(a, r)) for a, r in zip(answers, rows)]

        return score

    def matches(self, answer: str, row: dict) -> bool:
        value = str(row.get(self.column, ""))
        expected = self.label_map.get(value, value).strip()
        got: Any = answer.strip()
        if self.json_field is not None:
            parsed = answer_json(answer)
            if not isinstance(parsed, dict) or self.json_field not in parsed:
                return False
            got = parsed[self.json_field]
            if not isinstance(got, str | int | float) or isinstance(got, bool):
                return False
            got = str(got).strip()
        return got.casefold() == expected.casefold() if self.ignore_case else got == expected


class RegexReward(Section):
    name: Literal["regex"]
    pattern: str = Field(..., description="Found anywhere in the answer (re.search); anchor it with ^ and $.")
    weight: float = 1.0

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value

    def build(self, device, field: str) -> Scorer:
        pattern = re.compile(self.pattern)

        def score(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
            return [float(pattern.search(a) is not None) for a in answers]

        return score


class JsonSchemaReward(Section):
    name: Literal["json_schema"]
    json_schema: dict = Field(..., alias="schema", description="A JSON Schema, in the subset SCHEMA_KEYWORDS.")
    weight: float = 1.0

    model_config = {**Section.model_config, "populate_by_name": True, "serialize_by_alias": True}

    @field_validator("json_schema")
    @classmethod
    def _supported(cls, value: dict) -> dict:
        problems = schema_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def build(self, device, field: str) -> Scorer:
        def score(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
            return [float(fits(v, self.json_schema)) if (v := answer_json(a)) is not _NOT_JSON else 0.0
                    for a in answers]

        return score


class RunReward(Section):
    name: Literal["run"]
    run: str = Field(..., description="Run directory of a classifier, a causal run on label data, or a reward "
                     "model; relative to the config file.")
    label: str = Field("positive", description="With a classifier: the label whose log-odds is the reward.")
    weight: float = 1.0

    def build(self, device, field: str) -> Scorer:
        from tunesmith.align.rewards import load_reward

        reward = load_reward(self.run, self.label, device, field=f"{field}.run", label_field=f"{field}.label")

        def score(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
            return [float(s) for s in reward(prompts, answers)]

        return score


REWARDS: dict[str, type[Section]] = {"function": FunctionReward, "exact": ExactReward, "regex": RegexReward,
                                     "json_schema": JsonSchemaReward, "run": RunReward}
RewardOptions = Annotated[Union[tuple(REWARDS.values())], Field(discriminator="name")]  # noqa: UP007


def check_rewards(rewards: list, base: Path, where: str) -> list[str]:
    """Problems found before anything runs, one line each: functions that do not import, run rewards
    that cannot score (found without loading their weights). Paths are made relative to ``base``,
    the config file's directory."""
    from tunesmith.align.rewards import check_reward

    problems = []
    for i, reward in enumerate(rewards):
        field = f"{where}.{i}"
        if isinstance(reward, FunctionReward):
            module, _, name = reward.function.partition(":")
            if module.endswith(".py"):
                reward.function = f"{relative_to(base, module)}:{name}"
            try:
                import_function(reward.function)
            except TunesmithError as err:
                problems += [f"{field}.function: {p}" for p in err.problems]
        elif isinstance(reward, RunReward):
            reward.run = relative_to(base, reward.run)
            try:
                check_reward(reward.run, reward.label, field=f"{field}.run", label_field=f"{field}.label")
            except TunesmithError as err:
                problems += err.problems
    return problems


def check_columns(rewards: list, columns: Sequence[str], prompts: str, where: str) -> None:
    """Every ``exact`` reward's column is a column of the prompts file, or one line saying which is not."""
    problems = [f"{where}.{i}.column: {prompts} has no column {r.column!r} (columns: {', '.join(columns)})"
                for i, r in enumerate(rewards) if isinstance(r, ExactReward) and r.column not in columns]
    if problems:
        raise TunesmithError(*problems)


def reward_names(rewards: list) -> list[str]:
    """A name per reward for metrics: its kind, numbered when two rewards are of one kind."""
    kinds = [r.name for r in rewards]
    return [k if kinds.count(k) == 1 else f"{k}_{kinds[:i].count(k) + 1}" for i, k in enumerate(kinds)]


class Rewards:
    """The rewards of ``grpo.rewards``, ready to score: ``(prompts, answers, rows) -> (total, by name)``,
    the total the weighted sum, each name's scores unweighted."""

    def __init__(self, rewards: list, device, where: str = "grpo.rewards"):
        self.names = reward_names(rewards)
        self.weights = [r.weight for r in rewards]
        self.scorers = [r.build(device, f"{where}.{i}") for i, r in enumerate(rewards)]

    def __call__(self, prompts: list[str], answers: list[str], rows: list[dict]) -> tuple[torch.Tensor, dict]:
        by_name = {}
        for name, scorer in zip(self.names, self.scorers):
            scores = [float(s) for s in scorer(prompts, answers, rows)]
            if len(scores) != len(answers):
                raise TunesmithError(f"reward {name}: {len(scores)} scores for {len(answers)} answers")
            by_name[name] = scores
        total = torch.zeros(len(answers), dtype=torch.float64)
        for name, weight in zip(self.names, self.weights):
            total += weight * torch.tensor(by_name[name], dtype=torch.float64)
        return total.float(), by_name


def import_function(spec: str) -> Callable:
    """The function that ``module:function`` or ``path/to/file.py:function`` names, or one line
    saying why there is none."""
    module_name, _, name = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise TunesmithError(f"{path}: file not found")
            loader = importlib.util.spec_from_file_location(f"tunesmith_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TunesmithError:
        raise
    except ModuleNotFoundError as err:
        raise TunesmithError(f"no module named {err.name!r} (is it importable here? or give path/to/file.py:"
                             f"{name})") from None
    except Exception as err:  # the user's module failed as it was imported: say how, in one line
        raise TunesmithError(f"importing {module_name} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TunesmithError(f"{module_name} has no function {name!r}")
    return function


def _number(value, spec: str) -> float:
    if isinstance(value, numbers.Real) and math.isfinite(value):  # bool and numpy's numbers too
        return float(value)
    raise TunesmithError(f"reward function {spec} returned {value!r}, not a finite number")


_NOT_JSON = object()
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def answer_json(answer: str):
    """The answer read as JSON, or ``_NOT_JSON``. A markdown code fence around it (```json ... ```),
    as chat models often write, is taken off first; any other text around the JSON makes it not JSON."""
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


# The JSON Schema keywords ``fits`` checks; annotations are accepted and change nothing.
SCHEMA_KEYWORDS = {
    "type": (str, list), "enum": list, "const": object, "properties": dict, "required": list,
    "additionalProperties": (bool, dict), "items": dict, "minItems": int, "maxItems": int, "minLength": int,
    "maxLength": int, "pattern": str, "minimum": (int, float), "maximum": (int, float),
}
SCHEMA_ANNOTATIONS = {"$schema", "$id", "title", "description", "default", "examples"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def schema_problems(schema: dict, path: str = "schema") -> list[str]:
    """Keywords outside ``SCHEMA_KEYWORDS``, values of the wrong kind, unknown types: one line each."""
    if not isinstance(schema, dict):
        return [f"{path}: a schema is a mapping"]
    problems = []
    for key, value in schema.items():
        if key in SCHEMA_ANNOTATIONS:
            continue
        if key not in SCHEMA_KEYWORDS:
            problems.append(f"{path}.{key}: not a keyword this check knows (known: {', '.join(SCHEMA_KEYWORDS)})")
        elif not isinstance(value, SCHEMA_KEYWORDS[key]):
            problems.append(f"{path}.{key}: {value!r} is not a valid value")
    types = schema.get("type", [])
    for t in [types] if isinstance(types, str) else types if isinstance(types, list) else []:
        if t not in _TYPES:
            problems.append(f"{path}.type: unknown type {t!r} (known: {', '.join(sorted(_TYPES))})")
    if isinstance(schema.get("pattern"), str):
        try:
            re.compile(schema["pattern"])
        except re.error as err:
            problems.append(f"{path}.pattern: not a regular expression: {err}")
    for key, sub in (schema.get("properties") or {}).items() if isinstance(schema.get("properties"), dict) else ():
        problems += schema_problems(sub, f"{path}.properties.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += schema_problems(schema[key], f"{path}.{key}")
    return problems


def fits(value, schema: dict) -> bool:
    """Whether the JSON ``value`` fits ``schema`` (a schema that ``schema_problems`` passed)."""
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return False
    if "enum" in schema and not any(_same(value, v) for v in schema["enum"]):
        return False
    if "const" in schema and not _same(value, schema["const"]):
        return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return False
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return False
        if "items" in schema and not all(fits(v, schema["items"]) for v in value):
            return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        for key, v in value.items():
            if key in properties:
                if not fits(v, properties[key]):
                    return False
            elif schema.get("additionalProperties", True) is False:
                return False
            elif isinstance(schema.get("additionalProperties"), dict) and not fits(v, schema["additionalProperties"]):
                return False
    return True


_PYTHON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if isinstance(value, bool):  # a Python bool is an int, a JSON boolean is not a number
        return name == "boolean"
    if name == "number":
        return isinstance(value, int | float)
    if name == "integer":
        return isinstance(value, int) or isinstance(value, float) and value.is_integer()
    return isinstance(value, _PYTHON_TYPES[name])


def _same(a, b) -> bool:
    # JSON equality: true is not 1, and 1 is 1.0
    return type(a) is type(b) and a == b or (isinstance(a, int | float) and isinstance(b, int | float)
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
