"""Map the user's columns onto one example kind, and turn examples into token ids and labels.

Kinds: ``prompt_completion``, ``chat`` (a list of role/content messages), ``text`` (plain text for
continued pre-training: every token trained), ``classification`` (text/label; on a causal model
the label becomes the completion of an instruction prompt), ``preference`` (a prompt and two
answers, the chosen one and the rejected one: ``data.preference``) and ``unpaired_preference`` (a
prompt, one answer and whether it is good: KTO's data, also in ``data.preference``).

Loss is only on completion / assistant tokens, and always on the end-of-turn token: a model that is
never shown where an answer ends never learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.data.io import raise_problems
from tunesmith.data.preference import to_pair, to_unpaired
from tunesmith.errors import TunesmithError

IGNORE = -100

# Column names tried, in order, for each role when the config does not name one.
GUESSES = {
    "prompt": ("prompt", "instruction", "input", "question", "query"),
    "completion": ("completion", "response", "output", "answer", "target"),
    "messages": ("messages", "conversation", "conversations", "chat"),
    "text": ("text", "content", "sentence", "review", "document"),
    "label": ("label", "labels", "category", "class", "sentiment"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "margin": ("margin",),
    "desirable": ("label", "desirable", "thumbs", "thumb"),
}
NEEDS = {
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "desirable"),
}
# Roles a kind takes when the data has them: the prompt of chat-form preference pairs is the
# messages their two conversations share; a margin weighs a pair in the reward model's loss.
OPTIONAL = {"preference": ("prompt", "margin")}


@dataclass
class Schema:
    kind: str
    columns: dict[str, str]  # role -> the user's column name

    @property
    def text_fields(self) -> list[str]:
        return [c for role, c in self.columns.items() if role not in ("label", "margin", "desirable")]


def detect_schema(records: list[dict], source: str, kind: str, named: dict[str, str | None]) -> Schema:
    """Pick the example kind and the column for each role, from the config or from column names."""
    found = [c for c in records[0] if not c.startswith("_")]

    def column(role: str) -> str | None:
        if named.get(role):
            return named[role]
        return next((c for c in GUESSES[role] if c in found), None)

    if kind == "auto" and (column("chosen") or column("rejected")):
        kind = "preference"  # even with one of the two missing, so that the error names it
    if kind == "auto" and all(column(r) for r in NEEDS["unpaired_preference"]):
        kind = "unpaired_preference"  # a prompt, a completion and a good/bad mark: KTO's data
    if kind == "auto":
        kind = next(
            (k for k in ("chat", "prompt_completion", "classification", "text")
             if all(column(r) for r in NEEDS[k])),
            None,
        )
        if kind is None:
            raise TunesmithError(
                f"{source}: cannot tell which columns to use; columns found: {', '.join(found)}; "
                "name them under data.columns (prompt/completion, messages, text/label or text)"
            )
    columns = {}
    problems = []
    for role in NEEDS[kind]:
        name = column(role)
        if name is None or name not in found:
            # Columns named by position only exist when the file is read without a header row.
            hint = "; columns are named by position (1, 2, ...) with data.header: false" if (name or "").isdigit() else ""
            problems.append(
                f"{source}: no column {name or role!r} for {role} ({kind} data); columns found: {', '.join(found)}{hint}"
            )
        else:
            columns[role] = name
    if problems:
        raise TunesmithError(*problems)
    for role in OPTIONAL.get(kind, ()):
        name = column(role)
        if name and name in found:
            columns[role] = name
        elif named.get(role):
            problems.append(f"{source}: no column {name!r} for {role} ({kind} data); columns found: {', '.join(found)}")
    if problems:
        raise TunesmithError(*problems)
    return Schema(kind, columns)


def to_examples(records: list[dict], schema: Schema, instruction: str, source: str) -> list[dict]:
    """Canonical examples: ``{"messages": [...]}`` or ``{"text": ...}``, plus ``label`` and ``_line``.

    ``_input`` keeps the user's own input text (without any instruction template), which is what
    the leakage audit compares: a shared template would make every pair look alike. Every row's
    problem is reported (up to ``io.MAX_PROBLEMS``), each naming its file, line and column.
    """
    examples, problems = [], []
    for r in records:
        line = r.get("_line")
        try:
            ex = _example(r, schema, instruction, f"{source}:{line}")
        except TunesmithError as err:
            problems += err.problems
            continue
        ex["_line"] = line
        ex["_where"] = f"{source}:{line}" if line is not None else source
        examples.append(ex)
    raise_problems(problems, source)
    return examples


def _example(r: dict, schema: Schema, instruction: str, where: str) -> dict:
    c = schema.columns
    if schema.kind == "text":
        return {"text": r[c["text"]], "_input": r[c["text"]]}
    if schema.kind == "chat":
        messages = _check_messages(r[c["messages"]], where)
        return {"messages": messages, "_input": "\n".join(m["content"] for m in messages if m["role"] != "assistant")}
    if schema.kind == "preference":
        return to_pair(r, c, where)
    if schema.kind == "unpaired_preference":
        return to_unpaired(r, c, where)
    if schema.kind == "prompt_completion":
        return {"messages": [{"role": "user", "content": r[c["prompt"]]},
                             {"role": "assistant", "content": r[c["completion"]]}],
                "_input": r[c["prompt"]]}
    label = str(r[c["label"]])
    return {"messages": [{"role": "user", "content": instruction.format(text=r[c["text"]])},
                         {"role": "assistant", "content": label}],
            "label": label, "_input": r[c["text"]]}


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise TunesmithError(f"{where}: messages must be a list of {{role, content}} objects")
    return messages


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    completion_tokens_lost: int = 0
    dropped_no_trained_token: int = 0
    split_into_blocks: int = 0
    lengths: list[int] = field(default_factory=list)


class Encoder:
    """Renders examples with the chat template (or the plain one) and tokenises them with labels."""

    def __init__(self, tokenizer, template: str = "chat", system_prompt: str | None = None,
                 max_length: int = 512):
        if template not in ("chat", "plain"):
            raise TunesmithError(f"data.template: unknown template {template!r}; use 'chat' or 'plain'")
        if template == "chat" and not tokenizer.chat_template:
            raise TunesmithError("data.template: this tokenizer has no chat template; use template: plain")
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.eos = tokenizer.eos_token

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, example: dict) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans that carry loss."""
        if "text" in example:
            text = example["text"] + self.eos
            return text, [(0, len(text))]
        messages = self._with_system(example["messages"])
        text, spans = "", []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prefix = self._render(messages[:i], generation_prompt=True)
                full = self._render(messages[: i + 1], generation_prompt=False)
                if not full.startswith(text) or not prefix.startswith(text) or not full.startswith(prefix):
                    raise TunesmithError("data.template: the chat template does not render turns as prefixes; use template: plain")
                end = full.index(self.eos, len(prefix)) + len(self.eos) if self.eos in full[len(prefix):] else len(full)
                spans.append((len(prefix), end))
                text = full
            else:
                text = self._render(messages[: i + 1], generation_prompt=False)
        if messages[-1]["role"] != "assistant":
            text = self._render(messages, generation_prompt=False)
        if spans and spans[-1][1] == len(text) and not text.endswith(self.eos):
            # A template that does not close the assistant turn: close it ourselves.
            text += self.eos
            spans[-1] = (spans[-1][0], len(text))
        return text, spans

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.template == "plain":
            body = "".join(
                m["content"] + self.eos + "\n" if m["role"] == "assistant" else f"{m['content']}\n"
                for m in messages
            )
            return body
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt_text(self, example: dict) -> str:
        """What the model sees before its answer: everything up to the last assistant turn."""
        messages = self._with_system(example["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._render(messages, generation_prompt=True)

    def encode_text(self, example: dict, stats: EncodeStats | None = None) -> list[dict]:
        """Plain text in blocks of at most max_length tokens: continued pre-training loses nothing
        to truncation, since a long document just becomes several blocks."""
        ids = self.tokenizer(example["text"] + self.eos, add_special_tokens=False)["input_ids"]
        if stats is not None:
            stats.examples += 1
            stats.lengths.append(len(ids))
            stats.split_into_blocks += len(ids) > self.max_length
        blocks = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]
        return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]

    def encode(self, example: dict, stats: EncodeStats | None = None) -> dict | None:
        """Token ids and labels (-100 where no loss). None when truncation left no trained token."""
        text, spans = self.render(example)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [
            tok if any(s <= start < e for s, e in spans) and end > start else IGNORE
            for tok, (start, end) in zip(ids, offsets)
        ]
        trained = sum(label != IGNORE for label in labels)
        if trained == 0:
            raise TunesmithError(f"{example.get('_where', 'example')}: example has no trained token (empty completion or no assistant turn)")
        if stats is not None:
            stats.examples += 1
            stats.lengths.append(len(ids))
        if len(ids) > self.max_length:
            lost = trained - sum(label != IGNORE for label in labels[: self.max_length])
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if stats is not None:
                stats.truncated += 1
                stats.completion_tokens_lost += lost
            if lost == trained:
                if stats is not None:
                    stats.dropped_no_trained_token += 1
                return None
        return {"input_ids": ids, "labels": labels}
