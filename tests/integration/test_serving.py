"""The whole system on CPU: Ray actors (1 prefill worker, 1 decode group of TP 2), gRPC router, client SDK.
Every completion is checked against single-process `LLM` greedy (or seeded) output on the same checkpoint."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import pytest

from client import AsyncClient, Client, KvrelayError
from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams

PROMPTS = ["Return a list of", "The default value is", "If the file does not exist,", "Raise a ValueError",
           "This module provides", "Return True if the"]
# Shares its first 3 blocks (48 tokens) and more with SHARED_B: the second request hits the prefix cache.
SYSTEM = ("The following functions are used to parse the arguments of the command line and to return the "
          "result of the call as a list of strings. Each string is one argument, in order, and the list is "
          "empty when there are none. ")
SHARED_A, SHARED_B = SYSTEM + "Return the first one.", SYSTEM + "Raise an error if"


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=512)


@pytest.fixture(scope="module")
def client(kvrelay_target):
    with Client(kvrelay_target, timeout=60) as c:
        yield c


def test_model_info(client):
    info = client.model_info()
    assert (info.model, info.architecture, info.vocab_size) == ("default_model", "LlamaForCausalLM", 4096)
    assert (info.prefill_workers, info.decode_groups, info.decode_tensor_parallel_size) == (1, 1, 2)
    assert info.has_tokenizer and info.max_model_len == 512


def test_concurrent_streams_equal_llm(llm, kvrelay_target, served):
    refs = llm.generate(PROMPTS, greedy(24))

    def one(prompt: str):
        with Client(kvrelay_target, timeout=60) as c:
            s = c.stream(prompt, max_tokens=24, temperature=0.0)
            chunks = list(s)
            return chunks, s.final

    # 6 concurrent streams over 4 decode seats: two wait in the router's line, then run.
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS))
    for (chunks, final), ref, prompt in zip(results, refs, PROMPTS):
        assert [t for c in chunks for t in c.token_ids] == ref.token_ids, prompt
        assert "".join(c.text for c in chunks) == ref.text
        assert len(chunks) >= 2  # streamed, not one blob
        assert final.finish_reason == ref.finish_reason
        assert final.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert final.usage.completion_tokens == len(ref.token_ids)
        t = final.timings
        assert 0 < t.first_token_ms <= t.kv_landed_ms <= t.total_ms
    served.wait_all_free()


def test_async_client_token_prompt_and_logprobs(llm, kvrelay_target):
    ids = llm.engine.tokenize("Return a list of")
    (ref,) = llm.generate([ids], greedy(12, logprobs=3))

    async def run():
        async with AsyncClient(kvrelay_target, timeout=60) as c:
            return await c.generate(ids, max_tokens=12, temperature=0.0, logprobs=3)

    import asyncio

    out = asyncio.run(run())
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert len(out.logprobs) == 12
    for got, want in zip(out.logprobs, ref.logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_prefix_cache_hits_in_usage(llm, client, served):
    refs = llm.generate([SHARED_A, SHARED_B], greedy(8))
    a = client.generate(SHARED_A, max_tokens=8, temperature=0.0)
    b = client.generate(SHARED_B, max_tokens=8, temperature=0.0)
    assert a.token_ids == refs[0].token_ids and b.token_ids == refs[1].token_ids
    assert b.usage.cached_prompt_tokens >= 48 and b.usage.cached_prompt_tokens % 16 == 0, b.usage
    assert b.usage.cached_prompt_tokens < b.usage.prompt_tokens
    # The decode group shares the prefix A left in its cache: those blocks were not sent again.
    d = b.usage.decode_cached_prompt_tokens
    assert d >= 48 and d % 16 == 0 and d < b.usage.prompt_tokens, b.usage
    served.wait_all_free()


def test_stop_strings_seeded_sampling_and_single_token(llm, client):
    (plain,) = llm.generate(["Return a list of"], greedy(24))
    stop = plain.text[10:14]
    (ref,) = llm.generate(["Return a list of"], greedy(24, stop=[stop]))
    out = client.generate("Return a list of", max_tokens=24, temperature=0.0, stop=[stop])
    assert out.finish_reason == ref.finish_reason == "stop" and out.text == ref.text and stop not in out.text
    assert out.token_ids == ref.token_ids

    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    (ref,) = llm.generate(["The default value is"], sampled)
    out = client.generate("The default value is", max_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
                          ignore_eos=True)
    assert out.token_ids == ref.token_ids  # seeds derive from (seed, token index): same wherever it runs

    (ref,) = llm.generate(["Raise a ValueError"], greedy(1))
    out = client.generate("Raise a ValueError", max_tokens=1, temperature=0.0)  # prefill worker alone
    assert out.token_ids == ref.token_ids and out.finish_reason == "length"


def test_cancelled_stream_frees_blocks_on_both_sides(client, served):
    s = client.stream("Return a list of", max_tokens=400, temperature=0.0, ignore_eos=True)
    it = iter(s)
    got = [next(it), next(it)]
    assert all(c.token_ids for c in got)
    loads = served.loads()
    assert loads[1].free_blocks < loads[1].num_blocks  # the decode group holds the request's blocks
    s.cancel()
    with pytest.raises(KvrelayError) as e:
        list(it)
    assert e.value.code == "CANCELLED"
    served.wait_all_free()


def test_workers_bind_the_node_address_and_want_the_secret(served):
    import grpc

    from protos import worker_pb2 as wpb
    from protos import worker_pb2_grpc as wpb_grpc
    from protos.guards import secret_metadata

    for spec in served.placed.prefill + served.placed.decode:
        host, port = spec.address.rsplit(":", 1)
        assert host not in ("0.0.0.0", "::", "")
        with grpc.insecure_channel(spec.address) as ch:
            stub = wpb_grpc.PrefillWorkerStub(ch) if spec in served.placed.prefill else wpb_grpc.DecodeGroupStub(ch)
            for metadata in ((), secret_metadata("guess")):
                with pytest.raises(grpc.RpcError) as e:
                    stub.GetLoad(wpb.LoadRequest(), timeout=5, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        if host != "127.0.0.1":  # bound to the node's address only: not reachable on loopback
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.RpcError) as e:
                    wpb_grpc.PrefillWorkerStub(ch).GetLoad(wpb.LoadRequest(), timeout=2,
                                                           metadata=served.metadata)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_deadline_aborts_everywhere(client, served):
    with pytest.raises(KvrelayError) as e:
        client.generate("Return a list of", max_tokens=400, temperature=0.0, ignore_eos=True, timeout=0.4)
    assert e.value.code == "DEADLINE_EXCEEDED"
    served.wait_all_free()


BAD = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[5, 4096]), "outside the vocabulary"),
    (dict(prompt="word " * 600), "at most 511 fit"),
    (dict(prompt="Return a list of", max_tokens=509), "lower max_tokens"),
    (dict(prompt="Return", temperature=-1.0), "temperature"),
    (dict(prompt="Return", top_p=0.0), "top_p"),
    (dict(prompt="Return", logprobs=21), "logprobs"),
    (dict(prompt="Return", stop_token_ids=[9999]), "stop_token_ids"),
    (dict(prompt="Return", max_tokens=0), "max_tokens"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_invalid_argument(client, kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(KvrelayError) as e:
        client.generate(kwargs.pop("prompt"), **kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and message in e.value.details, e.value


def test_duplicate_live_request_id(client, served):
    with client.stream("Return a list of", request_id="dup", max_tokens=400, ignore_eos=True) as s:
        next(iter(s))
        with pytest.raises(KvrelayError) as e:
            client.generate("Return a list of", request_id="dup", max_tokens=4)
        assert e.value.code == "ALREADY_EXISTS" and "already in use" in e.value.details
    served.wait_all_free()
    assert client.generate("Return a list of", request_id="dup", max_tokens=2).request_id == "dup"


def test_overload_is_resource_exhausted_and_bounded(client, served):
    """4 decode seats and a line of 3: with 7 long requests in, the 8th is turned away at once, with a status
    that says to retry; cancelling the 7 frees every seat, line place and block."""
    room = served.router.orch.room
    streams = [client.stream("Return a list of", max_tokens=400, ignore_eos=True) for _ in range(7)]
    deadline = time.monotonic() + 20
    while room.waiting < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert room.waiting == 3
    t0 = time.monotonic()
    with pytest.raises(KvrelayError) as e:
        client.generate("Return a list of", max_tokens=4)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "retry later" in e.value.details
    assert time.monotonic() - t0 < 2.0  # rejected, not queued
    for s in streams:
        s.cancel()
    served.wait_all_free()
    assert room.waiting == 0


def test_kvrelay_generate_cli(llm, kvrelay_target):
    (ref,) = llm.generate(["Return a list of"], greedy(20))
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--target", kvrelay_target,
                        "--temperature", "0", "--max-tokens", "20", "Return a list of"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.text + "\n" and "[length]" in r.stderr
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--target", kvrelay_target, ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr


def test_still_serving_after_everything(llm, client, served):
    refs = llm.generate(PROMPTS[:2], greedy(16))
    for prompt, ref in zip(PROMPTS[:2], refs):
        assert client.generate(prompt, max_tokens=16, temperature=0.0).token_ids == ref.token_ids
    loads = served.wait_all_free()
    assert all(x.healthy for x in loads)
