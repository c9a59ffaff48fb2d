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


class DataConfig(Section):
    path: str | None = Field(None, description="One file to split; or give train (+ validation/test).")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "prompt_completion", "chat", "text", "classification", "preference"] = "auto"
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
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows after cleaning.")
    split: SplitConfig = SplitConfig()
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

    @model_validator(mode="after")
    def _has_a_source(self) -> DataConfig:
        if not self.path and not self.train:
            raise ValueError("give data.path (one file to split) or data.train")
        if self.path and self.train:
            raise ValueError("give either data.path or data.train, not both")
        if "{text}" not in self.instruction:
            raise ValueError("data.instruction must contain {text}")
        return self
