"""Train kvrelay's embedded default model: a small Llama on the docstrings of Python's own standard library.

    python -m deploy.default_model.train --minutes 15 --out deploy/default_model

Everything it needs ships with Python: the corpus is every docstring in the standard library's own sources
(parsed with `ast`: no network, no extra data). It writes a HuggingFace-format directory (config.json,
model.safetensors in bfloat16, tokenizer.json, tokenizer_config.json, generation_config.json) that any kvrelay
command can serve, and that transformers can load. The result writes recognisably Python-documentation-like
English; it is a demo model for `make serve`, not a useful assistant. Any HF Llama/Mistral/Qwen2 directory can
replace it.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sys
import sysconfig
import time

VOCAB = 4096
CONFIG = dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "dist-packages", "pydoc_data", "__pycache__"}


def _comment_blocks(src: str) -> list[str]:
    """Runs of consecutive full-line `#` comments, joined into one paragraph each (long ones only)."""
    blocks, cur = [], []
    for line in src.splitlines():
        t = line.strip()
        if t.startswith("#") and not t.startswith("#!") and "-*-" not in t:
            cur.append(t.lstrip("#").strip())
        elif cur:
            text = " ".join(c for c in cur if c)
            if len(text) > 120 and sum(ch.isalpha() for ch in text) > 0.6 * len(text):
                blocks.append(text)
            cur = []
    return blocks


def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring, and every long block comment, in the standard library's
    sources, parsed without importing anything, deduplicated, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    tree_src = f.read()
                tree = ast.parse(tree_src)
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            texts = _comment_blocks(tree_src)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 60:
                        texts.append(doc.strip())
            for text in texts:
                if text not in seen:
                    seen.add(text)
                    docs.append(text)
    return docs


def train_tokenizer(docs: list[str], path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(path)
    # The special tokens by name, as transformers reads them (its chat templates render `bos_token` from here).
    with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    docs = stdlib_docstrings()
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.1f} MB of text", flush=True)
    tok_path = os.path.join(args.out, "tokenizer.json")
    os.makedirs(args.out, exist_ok=True)
    train_tokenizer(docs, tok_path)
    tok = Tokenizer.from_file(tok_path)
    ids: list[int] = []
    for d in docs:  # documents joined as <s> doc </s>
        ids += tok.encode(d).ids + [2]
    data = torch.tensor(ids, dtype=torch.int64)
    n_held = min(50_000, len(data) // 20)
    held = data[-n_held:]
    data = data[:-n_held]
    print(f"tokens: {len(data) / 1e6:.2f} M train, {len(held) / 1e3:.0f} k held out", flush=True)

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget = args.minutes * 60
    t0 = time.time()
    step = 0
    while (elapsed := time.time() - t0) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,))
        x = torch.stack([data[s:s + args.seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} {elapsed / 60:.1f} min loss {loss.item():.3f} lr {lr:.2e}", flush=True)
    model.eval()
    with torch.no_grad():
        xs = held[: (len(held) // args.seq_len) * args.seq_len].view(-1, args.seq_len)
        held_loss = sum(model(input_ids=x[None], labels=x[None]).loss.item() for x in xs) / len(xs)
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f}) after {step} steps", flush=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(dict(steps=step, minutes=args.minutes, seq_len=args.seq_len, batch=args.batch,
                       train_tokens=len(data), held_out_loss=held_loss, torch=torch.__version__,
                       python=sys.version.split()[0], docstrings=len(docs)), f, indent=2)


if __name__ == "__main__":
    main()
