"""Pure parts of the HTTP front: chat-template loading and rendering, request-body error messages, SSE framing
and the preemption counter's deltas."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from deploy import DEFAULT_MODEL_DIR
from engine.outputs import Logprob
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.client_stream import Chunk, Final
from router.errors import RequestError
from router.http.chat_template import ChatTemplate, chat_prompt_ids
from router.http.formats import ChatFormat, CompletionFormat
from router.http.logprobs import TokenTexts
from router.http.respond import ClosingStreamingResponse
from router.http.schemas import ChatCompletionRequest, CompletionRequest, ValidationError, describe_error
from router.http.sse import DONE, event
from router.metrics import RouterMetrics


class FakeTokenizer:
    """Byte tokens shifted by 3, with BOS = 1 prepended, as a Llama tokenizer's post-processor does."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [1] if add_special_tokens else []
        i = 0
        while i < len(text):
            if text.startswith("<s>", i):
                ids.append(1)
                i += 3
            else:
                ids.append(ord(text[i]) + 3)
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("<s>" if t == 1 else "</s>" if t == 2 else chr(t - 3) for t in ids)


def test_template_sources_and_rendering(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
                           "{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}]}))
    t = ChatTemplate.load(str(tmp_path), None, FakeTokenizer(), 1, (2,))
    assert t is not None and t.render([{"role": "user", "content": "hi"}], True) == "<s>[user]hi[assistant]"
    assert t.render([{"role": "user", "content": "hi"}], False) == "<s>[user]hi"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    t = ChatTemplate.load(str(tmp_path), None, FakeTokenizer(), 1, (2,))
    with pytest.raises(ValueError, match="the chat template refused these messages: no system role"):
        t.render([], True)
    override = tmp_path / "mine.jinja"
    override.write_text("{{ messages | tojson }}")
    t = ChatTemplate.load(str(tmp_path), str(override), FakeTokenizer(), 1, (2,))
    assert t.render([{"role": "user", "content": "é"}], True) == '[{"role": "user", "content": "é"}]'
    override.write_text("{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.load(str(tmp_path), str(override), FakeTokenizer(), 1, (2,))


def test_template_kwargs_cannot_replace_arguments_and_failures_are_value_errors(tmp_path):
    source = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[a]"
              "{% endif %}{% if turns is defined %}{{ 'turns: ' + turns }}{% endif %}")
    t = ChatTemplate(source, "inline", {})
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs, True, {"messages": [{"role": "x"}], "add_generation_prompt": False,
                                 "raise_exception": 1}) == "[user]hi[a]"
    assert t.render(msgs, False, {"turns": "2"}) == "[user]hiturns: 2"
    with pytest.raises(ValueError, match="the chat template failed on these messages: TypeError: "):
        t.render(msgs, False, {"turns": 2})  # str + int in the template


def test_generation_blocks_render_their_body():
    """transformers' `{% generation %}` tags (assistant-token masks) compile and leave the text unchanged."""
    t = ChatTemplate("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<{{ m.content }}>"
                     "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}", "inline", {})
    assert t.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False) == "q<a>"


def test_chat_prompts_get_no_bos_from_the_tokenizer():
    """As transformers' apply_chat_template(tokenize=True): the template writes BOS, the tokenizer adds none."""
    tok = Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    assert tok.encode("user: hi")[0] == 1  # the tokenizer's post-processor adds BOS by default
    assert chat_prompt_ids("<s>user: hi", tok) == tok.encode("user: hi")
    assert chat_prompt_ids("user: hi", tok) == tok.encode("user: hi")[1:]


def test_no_template_and_sandbox(tmp_path):
    assert ChatTemplate.load(str(tmp_path), None, FakeTokenizer(), 1, (2,)) is None
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    t = ChatTemplate.load(str(tmp_path), None, FakeTokenizer(), 1, (2,))
    with pytest.raises(ValueError, match="refused"):  # the sandbox blocks attribute escapes
        t.render([], True)
    # Special tokens from config.json's ids when tokenizer_config.json is absent
    assert t.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("model,body,message,param", [
    (CompletionRequest, '{"prompt": "x", "n": "2"}', "'n': Input should be a valid integer", "n"),
    (CompletionRequest, '{"prompt": "x", "stream": 1}', "'stream': Input should be a valid boolean", "stream"),
    (CompletionRequest, '{"prompt": "x", "stop": [1]}', "'stop' must be a string or a list of strings", "stop"),
    (ChatCompletionRequest, '{"messages": [{"content": "x"}]}', "'messages.0.role' is required", "messages"),
    (ChatCompletionRequest, '[1]', "the request body must be a JSON object", None),
])
def test_body_errors_say_what_to_fix(model, body, message, param):
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(body)
    assert describe_error(e.value) == (message, param)


def test_unknown_fields_ignored_and_ints_are_valid_floats():
    r = CompletionRequest.model_validate_json('{"prompt": [1, 2], "temperature": 0, "whatever": {"a": 1}}')
    assert r.temperature == 0.0 and r.prompt == [1, 2]


@pytest.mark.parametrize("model,required", [(CompletionRequest, {"prompt": "x"}),
                                            (ChatCompletionRequest, {"messages": [{"role": "user"}]})])
def test_null_means_the_default_for_every_optional_field(model, required):
    optional = [name for name, f in model.model_fields.items() if not f.is_required()]
    assert {"n", "stream", "ignore_eos", "logprobs", "skip_special_tokens"} <= set(optional)
    body = {**required, **dict.fromkeys(optional), "stream_options": {"include_usage": None}}
    assert model.model_validate_json(json.dumps(body)) == model.model_validate_json(json.dumps({
        **required, "stream_options": {}}))
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(json.dumps(dict.fromkeys(required)))
    assert describe_error(e.value)[0] == f"'{next(iter(required))}' is required"


@pytest.fixture
def metaspace(tmp_path) -> Tokenizer:
    """A SentencePiece-style tokenizer (Metaspace: '▁' marks a word's leading space, dropped at a text's start)."""
    vocab = {"<unk>": 0, "<s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁wor": 5, "ld": 6}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(str(tmp_path / "tokenizer.json"))


def test_logprob_tokens_keep_their_leading_spaces(metaspace):
    prompt, completion = [1, 2], [5, 6, 4, 3]  # "<s>Hello" then " wor" "ld" "!" " world"
    detok = IncrementalDetokenizer(metaspace, prompt)
    text = "".join(detok.add(t) for t in completion) + detok.flush()
    assert text == " world! world"
    lps = [Logprob(t, -0.5 - i, [(t, -0.5 - i), (3, -3.0)]) for i, t in enumerate(completion)]
    chunks = [Chunk(completion[:2], "", lps[:2]), Chunk(completion[2:], "", lps[2:])]
    final = Final("r", "length", 2, 4, 0, 0.0, 0.0, 0.0, 0.0)
    texts = TokenTexts(metaspace)
    whole = CompletionFormat(texts, True, [prompt[-1]]).whole(0, chunks, final)["logprobs"]
    assert whole["tokens"] == [" wor", "ld", "!", " world"] and "".join(whole["tokens"]) == text
    assert whole["text_offset"] == [0, 4, 6, 7]
    assert whole["top_logprobs"][1] == {"ld": -1.5, " world": -3.0}  # alternatives read after the previous token
    streamed = CompletionFormat(texts, True, [prompt[-1]])
    parts = [streamed.delta(0, c)["logprobs"] for c in chunks]
    assert sum((p["tokens"] for p in parts), []) == whole["tokens"]
    assert sum((p["text_offset"] for p in parts), []) == whole["text_offset"]
    chat = ChatFormat(texts, True, [prompt[-1]])
    content = [e for c in chunks for e in chat.delta(0, c)["logprobs"]["content"]]
    assert [e["token"] for e in content] == whole["tokens"] and content[0]["bytes"] == list(b" wor")
    assert ChatFormat(texts, True, [prompt[-1]]).whole(0, chunks, final)["logprobs"]["content"] == content


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
def test_a_stream_closes_its_choices_even_if_it_never_starts(spec_version):
    """The client is gone before the body starts: Starlette never runs the body iterator (2.0: the disconnect
    cancels the stream first; 2.4: the first send fails), yet the choices must be closed."""
    closed: list[bool] = []

    async def body() -> AsyncIterator[str]:
        yield "data: x\n\n"

    async def on_close() -> None:
        closed.append(True)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if spec_version == "2.4":
            raise OSError("the connection is closed")
        await asyncio.sleep(0)

    scope = {"type": "http", "asgi": {"spec_version": spec_version}}
    with contextlib.suppress(ClientDisconnect):
        asyncio.run(ClosingStreamingResponse(body(), on_close)(scope, receive, send))
    assert closed == [True]


def test_sse_framing():
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n' and DONE == "data: [DONE]\n\n"


def samples_of(m: RouterMetrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}


def test_preemptions_count_deltas_and_restarts():
    m = RouterMetrics("m")
    for n in (0, 3, 3, 5, 1):  # the worker restarted before the last poll and counts from 0 again
        m.worker_load("decode-0", running=2, waiting=1, num_blocks=10, free_blocks=4, preemptions=n)
    samples = samples_of(m)
    worker = (("model_name", "m"), ("worker", "decode-0"))
    assert samples[("kvrelay:num_preemptions_total", (("model_name", "m"),))] == 6
    assert samples[("kvrelay:kv_cache_usage_perc", worker)] == pytest.approx(0.6)
    assert samples[("kvrelay:num_requests_running", worker)] == 2


def test_streamed_chunks_count_tokens_and_spread_their_gap_per_token():
    """A chunk of k tokens after a gap g is k inter-token latencies of g/k; a request's first chunk (its wait is
    the TTFT) adds tokens but no latency. Every metric carries the model's name."""
    m = RouterMetrics("my-model")
    m.admitted(9)
    m.streamed(2, None)
    m.streamed(4, 0.012)  # 4 gaps of 3 ms
    m.streamed(1, 0.02)
    s = samples_of(m)
    model = (("model_name", "my-model"),)
    assert s[("kvrelay:prompt_tokens_total", model)] == 9 and s[("kvrelay:generation_tokens_total", model)] == 7
    itl = "kvrelay:inter_token_latency_seconds"
    assert s[(f"{itl}_count", model)] == 5 and s[(f"{itl}_sum", model)] == pytest.approx(0.032)
    assert s[(f"{itl}_bucket", (("le", "0.0025"), *model))] == 0
    assert s[(f"{itl}_bucket", (("le", "0.005"), *model))] == 4
    assert s[(f"{itl}_bucket", (("le", "0.02"), *model))] == 5
    assert m.snapshot()["prompt_tokens"] == 9 and m.snapshot()["completion_tokens"] == 7
    assert s and all(dict(labels)["model_name"] == "my-model" for _, labels in s)


@pytest.mark.parametrize("body", [
    b'{"prompt": [1, 2, 3], "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}',
    b'{"prompt": ["a", "b"], "temperature": 1}', b'{"prompt": [[1, 2], [3]]}', b'{"prompt": [1, "a"]}',
    b'{"prompt": "x", "max_tokens": 5.0}', b'{"prompt": "x", "max_tokens": true}', b'[1]', b'{"prompt": "x",}',
    b'{"prompt": "\\u00e9\\n"}', b'{"prompt": "x", "n": null}', b'\xff{}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "n"}]}',
    b'{"messages": [{"role": "user", "content": 3}]}',
])
def test_large_body_parse_accepts_and_refuses_what_the_small_one_does(body, monkeypatch):
    """Bodies over OFF_LOOP_BYTES take the thread and the pure-Python scanner: same requests, same errors."""
    import router.http.body as body_mod

    model = ChatCompletionRequest if b"messages" in body else CompletionRequest

    def outcome() -> tuple:
        try:
            return ("ok", asyncio.run(body_mod.parse_body(body, model)).model_dump())
        except ValidationError as e:
            return ("invalid", describe_error(e))
        except RequestError as e:
            return ("not json", e.code, e.message.split(":")[0])

    small = outcome()
    monkeypatch.setattr(body_mod, "OFF_LOOP_BYTES", 0)
    large = outcome()
    if small[0] == "invalid" and small[1][0].startswith("the request body is not valid JSON"):
        small = ("not json", "INVALID_ARGUMENT", "the request body is not valid JSON")  # the two parsers' words
    assert large == small
