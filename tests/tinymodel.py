"""A tiny causal LM built in-process, so trainer tests and benchmarks never touch the Hub.

The model is random (Qwen2 architecture, a few hundred thousand parameters) and its tokenizer
is a byte-level BPE trained here on a small corpus. Its chat template is ChatML with
`{% generation %}` markers around assistant turns, like TRL's training templates, so
assistant-only loss works on it exactly as on a real instruct model.

Heavy imports (torch, transformers, tokenizers) happen inside the functions: this module is
imported by tests that must still collect, and skip, when the trainer extra is missing.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from pathlib import Path

import pytest

# ChatML, as Qwen uses it; the end-of-turn token sits inside the generation block, so the model
# is trained to stop (TRL warns otherwise).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The learnable pattern: each animal has one colour, and the answer always has the same shape.
ANIMALS = {
    "cat": "black",
    "dog": "brown",
    "fox": "red",
    "frog": "green",
    "swan": "white",
    "crow": "grey",
    "bee": "yellow",
    "whale": "blue",
}
SYSTEM = "You are a helpful assistant."


def require_training_stack() -> None:
    """Skip when the trainer extra is missing; under CI=true a missing extra is a failure.

    The project rule: optional stacks skip with the reason locally, but CI must run them.
    """
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if os.environ.get("CI") == "true":
                raise RuntimeError(
                    f"CI=true but the trainer extra is not installed: {name} ({exc})"
                ) from exc
            pytest.skip(f"trainer extra not installed (pip install -e '.[trainer]'): {name}")


def _corpus() -> list[str]:
    words = [f"What colour is the {a}? The {a} is {c}." for a, c in ANIMALS.items()]
    words += [SYSTEM, "Hello there, how are you today? Fine, thanks.", "0123456789 ,.!?;:'\"()"]
    return words * 4


def build_tokenizer(path: Path) -> Path:
    """Train a byte-level BPE on the corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def build_tiny_model(path: Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Build and save (save_pretrained) a tiny random Qwen2 causal LM with its tokenizer.

    `hidden_size` and `layers` make it less tiny, for benchmarks (heads of 16 dimensions).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 16,
        num_key_value_heads=max(1, hidden_size // 32),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    return path


def chat_example(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One system+user+assistant example whose answer follows from the question."""
    animal = rng.choice(sorted(ANIMALS))
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What colour is the {animal}?"},
            {"role": "assistant", "content": f"The {animal} is {ANIMALS[animal]}."},
        ]
    }


def chat_jsonl(path: Path, n: int, *, seed: int = 0) -> Path:
    """Write n training examples in the bot's format (OpenAI chat fine-tuning JSONL)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            out.write(json.dumps(chat_example(rng)) + "\n")
    return path
