"""What a run saves, in a form that loads on any machine: the base model named by its Hub id.

PEFT writes the path the base model was loaded from into ``adapter_config.json`` and into its model
card: on the machine that trained, a directory in tunesmith's cache; on any other machine, in vLLM
or on the Hub, nothing. ``make_portable`` names the base by ``ModelOrigin.base_name`` (its Hub id)
there instead, writes the model card (base, method and, for weights de-quantised from a GGUF file,
how they differ from the Hub's), and keeps where the weights came from on this machine in the run's
``model_source.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.model import ModelOrigin, is_hub_id

PEFT_CONFIG = "adapter_config.json"
CARD = "README.md"
# The fields of a PEFT config that name a model to load: the base, and the tokenizer that prompt
# tuning reads its initial text with.
NAMING_FIELDS = ("base_model_name_or_path", "tokenizer_name_or_path")
VERSIONS_HEADING = "### Framework versions"


def make_portable(run, saved: Path, origin: ModelOrigin, method: str) -> None:
    """Name the base of what ``method`` saved in ``saved`` by its Hub id, write its model card, and
    record ``origin`` in ``run`` (a ``store.Run``)."""
    config = saved / PEFT_CONFIG
    if config.is_file():
        fields = json.loads(config.read_text())
        for key in NAMING_FIELDS:
            if fields.get(key) == origin.loaded_from:
                fields[key] = origin.base_name
        config.write_text(json.dumps(fields, indent=2, sort_keys=True))
    write_card(saved, origin, method)
    run.save_json("model_source", origin.record())


def write_card(saved: Path, origin: ModelOrigin, method: str) -> None:
    """The model card (README.md): PEFT's metadata with the base named by its Hub id, and a short
    text in place of PEFT's empty template; a new card where PEFT wrote none."""
    from huggingface_hub import ModelCard, ModelCardData

    path = saved / CARD
    old = ModelCard.load(path) if path.is_file() else None
    data = old.data if old else ModelCardData()
    on_hub = is_hub_id(origin.base_name)
    data.base_model = origin.base_name if on_hub else None
    peft = (saved / PEFT_CONFIG).is_file()
    tags = [t for t in (data.tags or []) if not t.startswith("base_model:")]  # PEFT's names the local path
    if peft and on_hub:
        tags.append(f"base_model:adapter:{origin.base_name}")
    data.tags = sorted({*tags, "tunesmith", method})
    if data.library_name is None and (saved / "config.json").is_file():
        data.library_name = "transformers"
    text = card_text(origin, method, peft)
    if old and VERSIONS_HEADING in old.text:  # PEFT's: the versions that wrote the adapter
        text += "\n" + old.text[old.text.index(VERSIONS_HEADING):].rstrip() + "\n"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(path)


def card_text(origin: ModelOrigin, method: str, peft: bool) -> str:
    """The card's text: which base, which method, how to load it, and the GGUF note where there is one."""
    lines = [f"# {method} fine-tune of {origin.base_name}", "",
             f"Trained with tunesmith, method `{method}`, on the base model `{origin.base_name}`."]
    if peft:
        lines.append(f"A PEFT adapter: load `{origin.base_name}` with the transformers auto class of the `task_type` "
                     "in adapter_config.json, then `peft.PeftModel.from_pretrained(base, this_directory)`.")
    if origin.note:
        lines += ["", origin.note]
    return "\n".join(lines) + "\n"
