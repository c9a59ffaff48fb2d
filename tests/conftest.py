"""Shared fixtures: a tiny Llama and tokenizer built from configs, and tiny data written here.

No downloads: the tokenizer is trained on a few sentences, the model is 2 layers of width 32.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

POSITIVE = ["great", "wonderful", "moving", "brilliant", "delightful", "superb", "charming", "fun"]
NEGATIVE = ["dull", "boring", "awful", "tedious", "clumsy", "bland", "lifeless", "weak"]
OPENERS = ["honestly the", "i think this", "overall the", "to me the", "as a whole the", "sadly or not the"]
NOUNS = ["film", "movie", "story", "script", "cast", "plot", "ending", "picture"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"a {w} {n} with {v} parts" for w in POSITIVE + NEGATIVE for n in NOUNS for v in ("some", "many")]
    corpus += ["positive negative classify sentiment review user assistant system the of and is to"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_model_dir(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    # A wide init: with the default 0.02 the tied output head cannot express a confident logit,
    # and LoRA (which leaves embeddings frozen) could barely lower the loss.
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    # Tiny models gain nothing from a second thread, and on a shared machine its spin-waits make
    # these tests several times slower. The real-model (slow) tests keep every thread.
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = make_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        initializer_range=0.2)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = make_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentiment rows whose label follows from the adjective: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        adj = rng.choice(POSITIVE if good else NEGATIVE)
        noun, other = rng.sample(NOUNS, 2)
        rows.append({"review": f"{rng.choice(OPENERS)} {noun} is {adj}, unlike the {other} of take {i}",
                     "sentiment": "fresh" if good else "rotten"})
    return rows


def random_examples(n: int, seed: int = 0, vocab: int = 300) -> list[dict]:
    """Tokenised examples of 5 to 19 random ids, the second half of each trained."""
    import torch

    from tunesmith.data.format import IGNORE

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = length // 2
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, model_dir: Path, data: dict, **sections) -> Path:
    import yaml

    config = {
        "model": {"name": str(model_dir)},
        "data": data,
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 20, "batch_tokens": 256, "lr": 0.05, "eval_every": 10, "save_every": 5,
                  "warmup_ratio": 0.0},
        "eval": {"samples": 1, "max_new_tokens": 4},
        "output": {"dir": str(path.parent / "run")},
    }
    for key, value in sections.items():
        base = config.get(key, {})
        if key == "method" and "name" in value:  # the defaults above that this method takes
            from tunesmith.methods import REGISTRY

            base = {k: v for k, v in base.items() if k in REGISTRY[value["name"]].options.model_fields}
        config[key] = {**base, **value}
    path.write_text(yaml.safe_dump(config))
    return path


def review_section(path: Path, n: int = 120, **extra) -> dict:
    """A data section for ``n`` tiny labelled reviews (fresh or rotten), written to ``path`` as JSONL."""
    return {"path": str(write_jsonl(path, review_rows(n))), "format": "classification",
            "columns": {"text": "review", "label": "sentiment"}, "instruction": "classify sentiment: {text}",
            "max_length": 64, "split": {"validation": 0.15, "test": 0.15}, **extra}


@pytest.fixture
def review_data(tmp_path) -> dict:
    """A data section for 120 tiny labelled reviews in a JSONL file, labelled positive or negative."""
    return review_section(tmp_path / "reviews.jsonl", label_map={"fresh": "positive", "rotten": "negative"})


def free_port() -> int:
    """A port free on this machine now, for the main process of a multi-process test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_fails(capsys, argv, *fragments) -> str:
    """Run the CLI; it must exit 2 with every fragment in its error output and no traceback."""
    from tunesmith.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs of reviews that differ only in their adjective, positive in the chosen one: learnable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        opener, noun = rng.choice(OPENERS), rng.choice(NOUNS)
        # Prompts of words drawn at random: distinct enough for the leakage audit to keep held-out pairs.
        rows.append({"prompt": "review " + " ".join(rng.sample(NOUNS + OPENERS, 3)),
                     "chosen": f"{opener} {noun} is {rng.choice(POSITIVE)}",
                     "rejected": f"{opener} {noun} is {rng.choice(NEGATIVE)}"})
    return rows


@pytest.fixture
def preference_data(tmp_path) -> dict:
    """A data section for 60 tiny preference pairs in a JSONL file."""
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(60))
    return {"path": str(path), "max_length": 96, "split": {"validation": 0.15, "test": 0.15}}


def unpaired_rows(n: int, seed: int = 0, good_every: int = 2) -> list[dict]:
    """Single reviews marked good when their adjective is positive (every ``good_every``-th row) and bad
    when it is negative: learnable unpaired preference data (KTO). Two adjectives of each kind: with
    more, a tiny model memorises the training prompts instead of learning the words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % good_every == 0
        rows.append({"prompt": "review " + " ".join(rng.sample(NOUNS + OPENERS, 3)),
                     "completion": f"{rng.choice(NOUNS)} {rng.choice(POSITIVE[:2] if good else NEGATIVE[:2])}",
                     "label": good})
    return rows


@pytest.fixture
def unpaired_data(tmp_path) -> dict:
    """A data section for 80 tiny answers marked good or bad, half each, in a JSONL file."""
    path = write_jsonl(tmp_path / "answers.jsonl", unpaired_rows(80))
    return {"path": str(path), "max_length": 96, "split": {"validation": 0.15, "test": 0.15}}


class _Passes:
    """``record_passes``'s handle: ``remove`` puts the engine's own pass back."""

    def __init__(self, model, record, monkeypatch=None):
        from tunesmith.serve.engine import Lane

        self.plain = Lane._forward

        def forward(lane, first, ids, *args, **kwargs):
            if lane.model is model:
                record(ids)
            return self.plain(lane, first, ids, *args, **kwargs)

        if monkeypatch is not None:
            monkeypatch.setattr(Lane, "_forward", forward)
        else:
            Lane._forward = forward

    def remove(self) -> None:
        from tunesmith.serve.engine import Lane

        Lane._forward = self.plain


def record_passes(model, record, monkeypatch=None) -> _Passes:
    """Call ``record(ids)`` with the token ids (rows x positions) of every forward pass the serving engine
    runs on ``model``, whichever forward it runs (transformers' or ``serve/decoder.py``'s), until the
    handle's ``remove`` (or the test's end, given its ``monkeypatch``)."""
    return _Passes(model, record, monkeypatch)
