"""The embedded default model (deploy/default_model): loads, matches HF, and writes language, not noise."""

import os
import random

import pytest
import torch

from checkpoints import hf_greedy
from engine import LLM, SamplingParams

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "default_model")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL, "model.safetensors")),
                                reason="default model not trained yet")


def test_default_model_matches_hf_and_streams_text():
    llm = LLM(MODEL, dtype="float32")
    prompt = "Return a list of"
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(MODEL, [ids], 24)[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)
    words = out.text.split()
    assert len(words) >= 8 and sum(w.strip(".,:;()'\"`").isalpha() for w in words) >= 0.6 * len(words)


def test_default_model_learned_language():
    import transformers

    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    sentence = "Return the number of items in the list. If the argument is a string, it is converted to an integer."
    words = sentence.split()
    random.Random(0).shuffle(words)

    def nll(text: str) -> float:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    assert nll(sentence) < nll(" ".join(words)) - 0.5
