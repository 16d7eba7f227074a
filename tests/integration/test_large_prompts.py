"""Huge text prompts cost the router's other streams nothing: text over the size limit is refused before any
tokenizing, on gRPC and HTTP, in well under a second; a large prompt under it is tokenized on a thread while
another stream keeps receiving tokens without a stall."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from local_system import start_local

from client import KvrelayError
from deploy import DEFAULT_MODEL_DIR
from engine.models.hf_config import load_model_config
from router.config import RouterConfig
from router.server import RouterServer

LIMIT = 4 << 20  # characters: a 1.5 MB prompt is tokenized (then too long in tokens), a 16 MB one is not
WORDS = "Return a list of the arguments of the command line, each one a string, in order. "


@pytest.fixture(scope="module")
def system():
    s = start_local(DEFAULT_MODEL_DIR, num_prefill=1, max_prompt_chars=LIMIT, http_port=0)
    yield s
    s.stop()


def text_of(chars: int) -> str:
    return (WORDS * (chars // len(WORDS) + 1))[:chars]


def test_a_huge_text_prompt_is_refused_by_size_at_once(system):
    huge = text_of(16 << 20)
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        system.client.generate(huge, max_tokens=4)
    assert time.monotonic() - t0 < 1.0
    assert e.value.code == "INVALID_ARGUMENT" and f"at most {LIMIT} are accepted" in e.value.details
    assert f"has {16 << 20} characters" in e.value.details
    base = f"http://127.0.0.1:{system.router.http_port}"
    over = text_of(LIMIT + 1)  # under the HTTP body cap, over the character limit
    for path, body in (("/v1/completions", {"prompt": over, "max_tokens": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": over}], "max_tokens": 4})):
        t0 = time.monotonic()
        r = httpx.post(base + path, json=body, timeout=30)
        assert time.monotonic() - t0 < 1.0, path
        assert r.status_code == 400 and f"at most {LIMIT} are accepted" in r.json()["error"]["message"], r.text
    r = httpx.post(base + "/v1/completions", json={"prompt": huge, "max_tokens": 4}, timeout=30)
    assert r.status_code == 413  # the body cap refuses it before reading it all


def test_tokenizing_a_large_prompt_does_not_stall_other_streams(system):
    arrivals: list[float] = []
    done = threading.Event()

    def stream() -> None:
        for _chunk in system.client.stream("The default value is", max_tokens=200, temperature=0.0,
                                          ignore_eos=True):
            arrivals.append(time.monotonic())
        done.set()

    threading.Thread(target=stream, daemon=True).start()
    while len(arrivals) < 5:  # streaming steadily
        time.sleep(0.01)
    big = text_of(1_500_000)
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        system.client.generate(big, max_tokens=4)
    t1 = time.monotonic()
    assert e.value.code == "INVALID_ARGUMENT" and "tokens" in e.value.details  # tokenized, then too long
    assert t1 - t0 > 0.2  # it was really tokenized (about 1 s of work for the tokenizer)
    during = [t for t in arrivals if t0 <= t <= t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1])]
    assert len(during) >= 3 and max(gaps) < 0.25, (t1 - t0, len(during), max(gaps))
    assert done.wait(60) and len(arrivals) >= 2
    system.wait_free()


def test_the_default_limit_is_what_the_prompt_tokens_can_spell():
    server = RouterServer(RouterConfig(port=0), load_model_config(DEFAULT_MODEL_DIR), [], [], secret="s")
    assert server.tokenizer is not None
    longest = server.tokenizer.max_token_chars()
    assert server._max_prompt_chars(511) == 511 * longest
    text = text_of(20_000)
    assert len(server.tokenizer.encode(text)) * longest >= len(text)  # the bound never refuses what fits
    explicit = RouterServer(RouterConfig(port=0, max_prompt_chars=10), load_model_config(DEFAULT_MODEL_DIR),
                            [], [], secret="s")
    assert explicit._max_prompt_chars(511) == 10
