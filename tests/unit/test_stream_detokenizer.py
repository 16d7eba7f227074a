"""`StreamDetokenizer` (tokenizers' DecodeStream) gives exactly the reference `IncrementalDetokenizer`'s deltas:
random token streams over a byte-level BPE and a SentencePiece-style tokenizer (byte fallback, a lone '▁',
special tokens kept or skipped, prompts ending mid-character), and the large-text encode path gives the same ids."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from deploy import DEFAULT_MODEL_DIR
from engine.output_processor import OutputState
from engine.sampling_params import SamplingParams
from engine.tokenizer import FAST_ENCODE_CHARS, IncrementalDetokenizer, StreamDetokenizer, Tokenizer


def _sentencepiece_style(path: str) -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁wor": 5, "ld": 6, "▁": 7, "a": 8}
    vocab.update({f"<0x{b:02X}>": 9 + b for b in range(256)})
    tok = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    tok.save(path)
    return Tokenizer(path)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request, tmp_path_factory) -> Tokenizer:
    if request.param == "byte_level":
        return Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    return _sentencepiece_style(str(tmp_path_factory.mktemp("sp") / "tokenizer.json"))


def test_deltas_equal_the_reference_on_random_streams(tok):
    rng = random.Random(12)
    v = tok.vocab_size
    # Half the draws from the whole vocabulary, half from its two ends (specials, bytes, the longest merges).
    edges = list(range(min(v, 40))) + list(range(max(0, v - 300), v))
    mismatches = []
    for _ in range(1500):
        pool = range(v) if rng.random() < 0.5 else edges
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        completion = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        skip = rng.random() < 0.5
        ref, new = IncrementalDetokenizer(tok, prompt, skip), StreamDetokenizer(tok, prompt, skip)
        want = [ref.add(t) for t in completion] + [ref.flush()]
        got = [new.add(t) for t in completion] + [new.flush()]
        if got != want:
            mismatches.append((prompt, completion, skip, want, got))
    assert not mismatches, mismatches[:3]


def test_real_text_streams_exactly_and_holds_incomplete_characters(tok):
    text = "Ünïcödé: café, naïve, 東京, 😀 emoji, ß and Ωmega. Hello world!"
    ids = tok.encode(text)
    prompt, rest = ids[:3], ids[3:]
    d = StreamDetokenizer(tok, prompt)
    deltas = [d.add(t) for t in rest]
    assert "".join(deltas) + d.flush() == tok.decode(ids)[len(tok.decode(prompt)):]
    assert all("\ufffd" not in x for x in deltas)
    assert len(d.window) <= len(rest) and not d.pending  # a few tokens of context, no copy of the prompt


def test_output_state_uses_the_stream_detokenizer_and_keeps_one_text(tok):
    st = OutputState(tok.encode("Hello"), SamplingParams(stop=("orl",)), tok)
    assert isinstance(st.detok, StreamDetokenizer) and not hasattr(st.detok, "text")


def test_large_text_encodes_to_the_same_ids():
    tok = Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    text = ("Return a list of the arguments, 東京 😀. " * (FAST_ENCODE_CHARS // 20))[:FAST_ENCODE_CHARS + 7]
    assert tok.encode(text) == tok._tok.encode(text).ids
    assert tok.encode(text, add_special_tokens=False) == tok._tok.encode(text, add_special_tokens=False).ids
    assert tok.max_token_chars() >= max(len(t) for t in tok._tok.get_vocab())
