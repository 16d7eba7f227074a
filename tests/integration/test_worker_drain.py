"""Scale-down on a real deployment of its own (Ray actors: 2 prefill workers, 2 decode groups of TP 1, supervised):
a decode group SIGTERMed and a prefill worker drained through `Deployment.drain`, each while 6 greedy streams are in
flight. The drained worker reports draining, takes no new work, finishes what it has (no stream migrates, every
one gets exactly `LLM`'s tokens), exits, and is retired (never restarted); new requests keep succeeding on the
others, and no block is held on the survivors afterwards."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from session_probe import SessionProbe, refused
from test_worker_restarts import _counter, pid_of
from threaded_streams import Streams

from client import Client
from deploy import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams
from protos import generation_pb2 as gpb
from protos import worker_pb2 as wpb
from protos import worker_pb2_grpc as wpb_grpc

PROMPTS = ["Return a list of", "The default value is", "If the file does not exist,", "Raise a ValueError",
           "This module provides", "Return True if the"]
PARAMS = [dict(max_tokens=40, temperature=0.0, ignore_eos=True) for _ in PROMPTS]
SAMPLING = gpb.SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def served():
    from serving import start_serving

    s = start_serving(supervise=True, prefill_workers=2, decode_groups=2, decode_tp=1, max_num_seqs=4,
                      max_queued_requests=16, max_restarts=3)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs():
    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=512)
    return [llm.generate([p], SamplingParams(**kw))[0].token_ids for p, kw in zip(PROMPTS, PARAMS)]


def load_of(served, name: str):
    return next(x for x in served.loads() if x.name == name)


@pytest.mark.parametrize("victim,how", [("decode-1", "sigterm"), ("prefill-1", "api")])
def test_drained_worker_finishes_its_streams_and_retires(served, refs, victim, how):
    sup, pool = served.supervisor, served.router.pool
    assert sup is not None and pool is not None
    served.wait_all_free()
    migrations, retries = _counter(served, "kvrelay:request_migrations_total"), \
        _counter(served, "kvrelay:request_retries_total")
    streams = Streams(served.target, PROMPTS, PARAMS)
    streams.wait_started()
    if victim.startswith("decode"):  # some of the streams are decoding on the victim now
        assert pool.find(victim).view.inflight > 0
    actor = served.deployment.units()[victim][0]
    if how == "sigterm":
        os.kill(pid_of(actor), signal.SIGTERM)
    else:
        served.deployment.drain(victim)
    t0 = time.monotonic()
    while not load_of(served, victim).draining:  # its load says so while it finishes its requests
        assert time.monotonic() - t0 < 5
        time.sleep(0.02)
    # Asked directly, it refuses new work as draining (what the router takes as "try another", not a failure).
    address = pool.find(victim).spec.address
    if victim.startswith("decode"):  # a command on a session: refused alone, the session goes on
        session = SessionProbe(address, served.metadata)
        session.send(wpb.SessionCommand(generate=wpb.LocalRequest(request_id="drain-probe", prompt_token_ids=[1, 2, 3],
                                                                  sampling=SAMPLING)))
        code, details = refused(session.wait("drain-probe"))
        assert not session.ended.is_set()
        session.close()
    else:
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                wpb_grpc.PrefillWorkerStub(ch).Prefill(wpb.PrefillRequest(
                    request_id="drain-probe", prompt_token_ids=[1, 2, 3], sampling=SAMPLING), timeout=10,
                    metadata=served.metadata)
        code, details = e.value.code().name, e.value.details()
    assert code == "UNAVAILABLE"
    assert details == f"{'decode group' if victim.startswith('decode') else 'prefill worker'} {victim} is draining"
    # New requests while it drains go elsewhere and succeed.
    with Client(served.target, timeout=60) as c:
        assert c.generate(PROMPTS[0], **PARAMS[0]).token_ids == refs[0]
    streams.join()
    assert streams.errors == [None] * len(PROMPTS)
    for i, (got, ref) in enumerate(zip(streams.tokens, refs)):
        assert got == ref, (i, len(got), got, ref)
    # Finished where they were: nothing migrated, nothing retried.
    assert _counter(served, "kvrelay:request_migrations_total") == migrations
    assert _counter(served, "kvrelay:request_retries_total") == retries
    while victim not in sup.drained:  # it exited and was retired, not restarted
        assert time.monotonic() - t0 < 20, sup.draining
        time.sleep(0.05)
    w = pool.find(victim)
    assert w.retired and not w.view.healthy and w.view.draining
    assert victim not in sup.restarts
    with Client(served.target, timeout=60) as c:
        for p, kw, ref in zip(PROMPTS, PARAMS, refs):
            assert c.generate(p, **kw).token_ids == ref
    loads = served.wait_all_free()  # the survivors: every block free again
    assert victim not in [x.name for x in loads] and len(loads) == 4 - (2 if victim == "prefill-1" else 1)
    assert all(x.free_blocks == x.num_blocks and not x.draining for x in loads)
