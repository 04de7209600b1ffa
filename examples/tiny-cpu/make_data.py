"""Generates this example's data and tokenizer, deterministically (run once; outputs are committed).

    python examples/tiny-cpu/make_data.py

data/stories.jsonl: {"text": ...} records from a small seeded grammar (easy to learn,
so the loss falls within a hundred steps); data/chat.jsonl: {"messages": [...]}
arithmetic dialogues; tokenizer/: a byte-level BPE (vocab 512) trained on both, saved
as a PreTrainedTokenizerFast folder with a simple chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
VOCAB_SIZE = 512
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "June"]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "duck", "bee", "frog", "mole"]
ADJECTIVES = ["small", "red", "quiet", "quick", "old", "green", "brave", "sleepy", "happy", "tall"]
PLACES = ["the barn", "the river", "the hill", "the garden", "the forest", "the lake", "the market"]
VERBS = ["saw", "found", "followed", "fed", "helped", "chased", "met", "called"]
ENDINGS = ["and they became friends.", "and it ran away.", "and it was happy.", "and they went home."]


def story(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 9)):
        name, verb = rng.choice(NAMES), rng.choice(VERBS)
        adj, animal, place = rng.choice(ADJECTIVES), rng.choice(ANIMALS), rng.choice(PLACES)
        sentences.append(f"{name} {verb} a {adj} {animal} near {place}, {rng.choice(ENDINGS)}")
    return " ".join(sentences)


def dialogue(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": "You add numbers."}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        messages.append({"role": "user", "content": f"What is {a} plus {b}?"})
        messages.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build_tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(HERE / "tokenizer"))


def main() -> None:
    rng = random.Random(1234)
    stories = [{"text": story(rng)} for _ in range(900)]
    chats = [dialogue(rng) for _ in range(300)]
    write_jsonl(HERE / "data" / "stories.jsonl", stories)
    write_jsonl(HERE / "data" / "chat.jsonl", chats)
    texts = [r["text"] for r in stories] + [m["content"] for c in chats for m in c["messages"]]
    build_tokenizer(texts)


if __name__ == "__main__":
    main()
