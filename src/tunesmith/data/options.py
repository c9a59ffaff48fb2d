"""The ``data:`` section of a run's configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.data.canaries import CanaryConfig
from tunesmith.options import Section


class ColumnsConfig(Section):
    """Which of the user's columns play which role. Unset roles are guessed from common names.

    With ``data.header: false`` columns are named by position: 1, 2, ...
    """

    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    text: str | None = None
    label: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    margin: str | None = None
    desirable: str | None = Field(None, description="Unpaired preference data (KTO): the column saying whether "
                                  "the answer is good (true/false, 1/0, good/bad, up/down); default: label, "
                                  "desirable or thumbs.")

    @field_validator("*", mode="before")
    @classmethod
    def _positions_as_names(cls, value):
        # `label: 1` in YAML is an int; a column named by position is still a name.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    stratify: bool = True

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1, leaving rows to train on")
        return self


class SourceConfig(Section):
    """One source of a multi-task mix (``data.sources``): its own file, format, columns, instruction and
    weight. Everything else (template, max_length, split fractions, cleaning) is the data section's."""

    path: str
    name: str | None = Field(None, description="Shown in the report; default: the file's name without suffix.")
    format: Literal["auto", "prompt_completion", "chat", "text", "classification"] = "auto"
    header: bool = True
    columns: ColumnsConfig = ColumnsConfig()
    label_map: dict[str, str] | None = None
    instruction: str = "{text}"
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many of its rows after cleaning; "
                                 "default: data.max_rows.")
    weight: float = Field(1.0, ge=0, description="Its share of the training mix, relative to the others' weights.")

    @property
    def label(self) -> str:
        from pathlib import PurePath

        return self.name or PurePath(self.path.removeprefix("builtin:")).name.split(".")[0]


class DataConfig(Section):
    path: str | None = Field(None, description="One file to split; or give train (+ validation/test).")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "prompt_completion", "chat", "text", "classification", "preference",
                    "unpaired_preference"] = "auto"
    header: bool = Field(
        True, description="CSV/TSV: the first row names the columns; false: every row is data, and "
        "columns are named by position (1, 2, ...)."
    )
    tsv_quoting: bool = Field(
        False, description="TSV: treat double quotes as quoting (as CSV does). Off by default: tab-separated "
        "files are rarely quoted, and texts often hold stray quotes."
    )
    columns: ColumnsConfig = ColumnsConfig()
    label_map: dict[str, str] | None = Field(
        None, description="Rename labels; rows whose label is not a key are dropped."
    )
    instruction: str = Field(
        "{text}", description="For label data on a causal model: the prompt, with {text} filled in."
    )
    template: str = Field("chat", description="'chat' (the tokenizer's chat template) or 'plain'.")
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows after cleaning (with "
                                 "data.sources: of each source that sets no max_rows of its own).")
    split: SplitConfig = SplitConfig()
    balance: Literal["none", "class", "sqrt"] = Field(
        "none", description="Label data: how training draws its rows. none: as they come; class: every label "
        "equally often (class-balanced sampling); sqrt: each label in proportion to the square root of its count."
    )
    seed: int = 0
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)
    pii: Literal["redact", "drop", "report"] | None = Field(
        None, description="Personal data in the text fields (e-mail, phone, card, IBAN, IP, id numbers, URL "
        "credentials; names with tunesmith[pii-ner]): redact it with typed placeholders, drop its rows, or only "
        "count it."
    )
    canaries: CanaryConfig | None = Field(
        None, description="Put synthetic secrets into the training split, for `tunesmith privacy audit`."
    )
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="Several files mixed into one training set by weight, each split, "
        "validated and tested on its own (instead of data.path)."
    )
    temperature: float | None = Field(
        None, gt=0, description="With sources: mix by size**(1/temperature) instead of by weight (1: by "
        "size; larger: closer to uniform)."
    )

    @model_validator(mode="after")
    def _has_a_source(self) -> DataConfig:
        if self.sources is not None:
            return self._check_sources()
        if not self.path and not self.train:
            raise ValueError("give data.path (one file to split) or data.train")
        if self.path and self.train:
            raise ValueError("give either data.path or data.train, not both")
        if "{text}" not in self.instruction:
            raise ValueError("data.instruction must contain {text}")
        return self

    def _check_sources(self) -> DataConfig:
        if self.path or self.train:
            raise ValueError("give either data.sources or data.path / data.train, not both")
        names = [s.label for s in self.sources]
        if len(set(names)) < len(names):
            raise ValueError(f"data.sources: two sources are named {max(names, key=names.count)!r}; give each a name")
        if self.temperature is not None:
            weighted = [s.label for s in self.sources if "weight" in s.model_fields_set]
            if weighted:
                raise ValueError(f"data.sources: give weights or data.temperature, not both (weight on {weighted[0]})")
        elif sum(s.weight for s in self.sources) <= 0:
            raise ValueError("data.sources: the weights sum to 0; give at least one source a positive weight")
        for s in self.sources:
            if "{text}" not in s.instruction:
                raise ValueError(f"data.sources: the instruction of {s.label} must contain {{text}}")
        if self.canaries:
            raise ValueError("data.canaries: not available with data.sources")
        if self.balance != "none":
            raise ValueError("data.balance: not available with data.sources (balance one labelled file)")
        return self
