"""Small random HF checkpoints (and a tiny real tokenizer) for tests, made with transformers' save_pretrained."""

from __future__ import annotations

import os
from typing import Any

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in fixed-size blocks. "
    "Prefill is compute-bound; decode is memory-bound. Ünïcödé: café, naïve, 東京, 😀 emoji, ß and Ωmega. "
) * 4

BASE: dict[str, Any] = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, initializer_range=0.2,
)


def train_tokenizer(path: str, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer.json (multi-byte characters span several tokens) with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(path)


def make_checkpoint(path: str, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                    tokenizer: bool = True, **overrides: Any) -> str:
    """Write a random `arch` ("llama", "mistral", "qwen2") checkpoint to `path`; returns `path`."""
    import torch
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs = {**BASE, **overrides}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        train_tokenizer(os.path.join(path, "tokenizer.json"), kwargs["vocab_size"])
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu",
              dtype: str = "float32") -> list[list[int]]:
    """Reference: transformers greedy generation, one prompt at a time (no padding effects)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs
