"""A decode group's Session carries many requests on one stream: their tokens equal `LLM`'s, one message carries
several requests' tokens (fewer messages than tokens), a refused command ends only its request, a cancel frees
exactly its request's blocks while the others finish, and closing the session frees every block it held."""

from __future__ import annotations

import time

import pytest
from local_system import start_local
from session_probe import SessionProbe, generate, refused

from engine import LLM, SamplingParams
from protos import generation_pb2 as pb
from protos import worker_pb2 as wpb

N = 6
MAX_TOKENS = 16
PROMPTS = [[(7 * i + j) % 300 + 3 for j in range(5 + 3 * i)] for i in range(N)]
GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def system(llama_dir):
    s = start_local(llama_dir, num_prefill=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs(llama_dir):
    return [r.token_ids for r in LLM(llama_dir, max_model_len=256).generate(PROMPTS, SamplingParams(**GREEDY))]


def reserve(rid: str, prompt: list[int]) -> wpb.SessionCommand:
    return wpb.SessionCommand(decode=wpb.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, prefill_worker="p0", prefill_tensor_parallel_size=1,
        sampling=pb.SamplingParams(max_tokens=4, temperature=0.0), transfer_timeout_s=600))


def wait_until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_many_requests_on_one_session_get_exact_tokens_in_few_messages(system, refs):
    session = SessionProbe(system.decode.address, system.metadata)
    session.send(*[generate(f"r{i}", p, **GREEDY) for i, p in enumerate(PROMPTS)])  # one message, six requests
    for i, ref in enumerate(refs):
        assert session.wait(f"r{i}").finished.finish_reason == "length"
        assert session.tokens(f"r{i}") == ref, i
    with_tokens = [m for m in session.messages if any(e.WhichOneof("kind") == "tokens" for e in m.events)]
    tokens = sum(len(e.tokens.token_ids) for m in with_tokens for e in m.events if e.WhichOneof("kind") == "tokens")
    assert tokens == N * MAX_TOKENS
    assert len(with_tokens) < tokens // 2, (len(with_tokens), tokens)  # not a message per token
    assert max(len({e.request_id for e in m.events}) for m in with_tokens) > 1  # one step, several requests
    session.close()
    system.wait_free()


def test_a_refused_command_does_not_end_the_session(system, refs):
    session = SessionProbe(system.decode.address, system.metadata)
    session.send(generate("ok", PROMPTS[0], **GREEDY), generate("bad", [4_000_000_000], **GREEDY),
                 wpb.SessionCommand(decode=wpb.DecodeRequest(request_id="ghost", prompt_token_ids=[5],
                                                             prefill_worker="ghost", prefill_tensor_parallel_size=1)))
    assert refused(session.wait("bad"))[0] == "INVALID_ARGUMENT"
    assert refused(session.wait("ghost"))[0] == "FAILED_PRECONDITION"
    assert session.wait("ok").finished.finish_reason == "length" and session.tokens("ok") == refs[0]
    session.send(generate("ok", PROMPTS[1], **GREEDY))  # the id is free again once its request finished
    assert session.wait("ok", ("finished",)).finished.finish_reason == "length"
    assert not session.ended.is_set()
    session.close()
    assert session.error is None
    system.wait_free()


def test_cancelling_one_request_frees_exactly_its_blocks_while_the_others_finish(system, refs):
    stats = lambda: system.decode.loop.stats  # noqa: E731
    total = stats().num_blocks
    session = SessionProbe(system.decode.address, system.metadata)
    # Two reservations hold a fixed number of blocks (no KV comes: nothing grows); the generates decode meanwhile.
    session.send(reserve("held", [9] * 40), reserve("dropped", [8] * 70),
                 *[generate(f"g{i}", p, **{**GREEDY, "max_tokens": 60}) for i, p in enumerate(PROMPTS[:3])])
    held = session.wait("held", ("reserved",)).reserved.num_blocks
    dropped = session.wait("dropped", ("reserved",)).reserved.num_blocks
    assert held >= 3 and dropped >= 5
    wait_until(lambda: all(session.tokens(f"g{i}") for i in range(3)))
    session.send(wpb.SessionCommand(cancel="dropped"), wpb.SessionCommand(cancel="g1"))
    for i in (0, 2):
        assert session.wait(f"g{i}").finished.finish_reason == "length"
        assert len(session.tokens(f"g{i}")) == 60 and session.tokens(f"g{i}")[:MAX_TOKENS] == refs[i]
    # Everything but the reservation left is free: the cancelled reservation's and generate's blocks too.
    wait_until(lambda: stats().free_blocks == total - held and stats().remote == 1 and not stats().running)
    assert not [e for e in session.of("dropped") + session.of("g1") if e.WhichOneof("kind") == "finished"]
    session.send(wpb.SessionCommand(cancel="held"))
    wait_until(lambda: stats().free_blocks == total and stats().remote == 0)
    session.close()


def test_closing_the_session_aborts_all_of_its_requests(system, refs):
    stats = lambda: system.decode.loop.stats  # noqa: E731
    session = SessionProbe(system.decode.address, system.metadata)
    session.send(reserve("held", [9] * 40),
                 *[generate(f"c{i}", p, **{**GREEDY, "max_tokens": 200}) for i, p in enumerate(PROMPTS)])
    session.wait("held", ("reserved",))
    wait_until(lambda: all(session.tokens(f"c{i}") for i in range(N)))
    assert stats().free_blocks < stats().num_blocks
    session.close()
    assert session.error is None
    wait_until(lambda: stats().free_blocks == stats().num_blocks and stats().remote == 0 and not stats().running
               and not stats().waiting)
    assert system.client.generate(PROMPTS[0], **GREEDY).token_ids == refs[0]  # and the group serves on


def test_the_router_keeps_one_session_per_group(system, refs):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(N) as ex:
        outs = list(ex.map(lambda p: system.client.generate(p, **GREEDY).token_ids, PROMPTS))
    assert outs == refs
    client = system.router.pool.decode[0].client
    first = client._session
    assert system.client.generate(PROMPTS[1], **GREEDY).token_ids == refs[1]
    assert client._session is first and first.broken is None and not first.queues
    system.wait_free()
