"""Tiny random models and a tokenizer built at test time, with no download.

The tokenizer is a word-level one over a small fixed vocabulary (plus byte-level fallback is
not needed: unknown words map to <unk>), wrapped as a PreTrainedTokenizerFast with EOS/PAD/BOS
and a chat template, so every code path that a real model takes (padding side, chat template,
special tokens) is exercised. Models are a 2-layer Llama (causal LM) and a 2-layer Llama
sequence classifier, a few hundred thousand parameters each.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = (
    "the a an is was good bad great terrible happy sad love hate movie film story day i you it "
    "this that and but not very really so what how why who write tell me about robot poem "
    "kl divergence explain name friendly ai assistant stages of rlhf short simple terms ! . , ? "
    "hello world yes no maybe wonderful awful nice excellent boring fun"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=128,
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(tok: PreTrainedTokenizerFast, **extra: object) -> LlamaConfig:
    """The tiny Llama's config; `extra` adds fields or overrides its sizes."""
    fields: dict[str, object] = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }
    return LlamaConfig(**{**fields, **extra})


VLLM_SIZES = {"num_attention_heads": 2, "num_key_value_heads": 2}
"""make_causal_lm's sizes for a tiny LM vLLM can serve: head size 32 (64 / 2 heads), as its CPU
attention takes only multiples of 32 (the default tiny LM's is 16)."""


def make_causal_lm(folder: Path, seed: int = 0, **sizes: int) -> Path:
    """Saves a tiny random causal LM + tokenizer to `folder`; returns it. `sizes` override
    the config's (vocab_size, hidden_size, num_hidden_layers, ...) for a bigger one."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = LlamaForCausalLM(_config(tok, **sizes))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_classifier(
    folder: Path, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"), seed: int = 0
) -> Path:
    """Saves a tiny random sequence classifier (len(labels) logits) + tokenizer to `folder`."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    config = _config(
        tok,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
