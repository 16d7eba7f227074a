"""The internal API is not an attack surface (in one process, no Ray): calls without the deployment's secret get
UNAUTHENTICATED and change nothing; a Connect to a dead address fails only itself while prefills go on; bad
fields get INVALID_ARGUMENT saying what to fix; undecodable bytes get INVALID_ARGUMENT with one log line, on the
internal and the public API; after 1,000 fuzzed internal requests the system still gives LLM's greedy tokens. A
decode group's requests are commands on its Session: each is validated the same way, and a bad one refuses only
its request (the session goes on)."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time

import grpc
import pytest
from local_system import start_local
from session_probe import SESSION, SessionProbe, refused

from engine import LLM, SamplingParams
from protos import generation_pb2 as pb
from protos import worker_pb2 as wpb
from protos.guards import secret_metadata

GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[11, 12, 13, 14] * 4, [21, 22, 23] * 5]
P, D = "/kvrelay.internal.v1.PrefillWorker/", "/kvrelay.internal.v1.DecodeGroup/"
GENERATE = "/kvrelay.v1.Generation/Generate"
STREAMING = {GENERATE}


@pytest.fixture(scope="module")
def system(llama_dir):
    s = start_local(llama_dir, num_prefill=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs(llama_dir):
    return [r.token_ids for r in LLM(llama_dir, max_model_len=256).generate(PROMPTS, SamplingParams(**GREEDY))]


def address(system, method: str) -> str:
    return system.prefill[0].address if method.startswith(P) else system.decode.address


def call(target: str, method: str, body: bytes, metadata=(), timeout: float = 5.0) -> tuple[str, str]:
    """(status name, details) of one call with raw request bytes; a stream is read to its end."""
    with grpc.insecure_channel(target) as ch:
        try:
            if method == SESSION:  # one message of commands; the group ends the session once ours ended
                for _ in ch.stream_stream(method, request_serializer=lambda b: b,
                                          response_deserializer=lambda b: b)(iter([body]), metadata=metadata,
                                                                              timeout=timeout):
                    pass
            elif method in STREAMING:
                it = ch.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
                    body, metadata=metadata, timeout=timeout)
                for _ in it:
                    pass
            else:
                ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
                    body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""
    return "OK", ""


def assert_serving(system, refs) -> None:
    for prompt, ref in zip(PROMPTS, refs):
        assert system.client.generate(prompt, **GREEDY).token_ids == ref
    system.wait_free()
    assert system.prefill[0].loop.error is None and system.decode.loop.error is None


def decode_request(system, **kw) -> wpb.SessionCommand:
    base = dict(request_id="probe", prompt_token_ids=[5, 6, 7], prefill_worker="p0", prefill_tensor_parallel_size=1,
                sampling=pb.SamplingParams(max_tokens=4, temperature=0.0))
    return wpb.SessionCommand(decode=wpb.DecodeRequest(**{**base, **kw}))


def first_token(rid: str, token: int) -> wpb.SessionCommand:
    return wpb.SessionCommand(first_token=wpb.FirstToken(request_id=rid, token_id=token))


def request_id(cmd: wpb.SessionCommand) -> str:
    kind = cmd.WhichOneof("kind")
    return cmd.cancel if kind == "cancel" else getattr(cmd, kind).request_id


def test_calls_without_the_secret_are_unauthenticated_and_change_nothing(system, refs):
    dead = wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
        wpb.ChannelAddress(decode_rank=0, prefill_rank=0, host="127.0.0.1", port=1)])
    calls = [(P + "Prefill", wpb.PrefillRequest(request_id="x", prompt_token_ids=[5, 6])),
             (P + "Connect", dead), (P + "GetLoad", wpb.LoadRequest()),
             (D + "Listen", wpb.ListenRequest(prefill_worker="p0", prefill_tensor_parallel_size=1)),
             (SESSION, wpb.SessionCommands(commands=[decode_request(system), first_token("x", 1)])),
             (D + "GetLoad", wpb.LoadRequest())]
    for metadata, says in (((), "calls need the deployment's secret"),
                           (secret_metadata("not-the-secret"), "is not this deployment's secret")):
        for method, msg in calls:
            t0 = time.monotonic()
            code, details = call(address(system, method), method, msg.SerializeToString(), metadata)
            assert (code, time.monotonic() - t0 < 2) == ("UNAUTHENTICATED", True), (method, code, details)
            assert says in details and "x-kvrelay-secret" in details, details
    stats = [system.prefill[0].loop.stats, system.decode.loop.stats]
    assert all(s.free_blocks == s.num_blocks and not (s.running or s.waiting or s.remote) for s in stats)
    assert_serving(system, refs)


def test_connect_to_a_dead_address_fails_only_itself(system, refs):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
        wpb.ChannelAddress(decode_rank=0, prefill_rank=0, host="127.0.0.1", port=port)])
    result: list = []
    t = threading.Thread(target=lambda: result.append(call(system.prefill[0].address, P + "Connect",
                                                           dead.SerializeToString(), system.metadata, 4.0)))
    t.start()
    time.sleep(0.3)  # the connect is under way, its TCPStore retrying the dead port
    t0 = time.monotonic()
    assert_serving(system, refs)  # prefills to d0 go on, on the pair's existing channels
    assert time.monotonic() - t0 < 3.5 and t.is_alive()  # done while the Connect still waits
    t.join(10)
    assert result[0][0] in ("DEADLINE_EXCEEDED", "UNAVAILABLE"), result
    assert_serving(system, refs)


def bad_requests(system) -> list[tuple[str, object, str, str]]:
    ch = wpb.ChannelAddress
    return [
        (P + "Prefill", wpb.PrefillRequest(prompt_token_ids=[5]), "INVALID_ARGUMENT", "request_id is empty"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a", prompt_token_ids=[5, 4_000_000_000]), "INVALID_ARGUMENT",
         "[4000000000] are outside the vocabulary"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a"), "INVALID_ARGUMENT", "prompt_token_ids is empty"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a", prompt_token_ids=[5] * 300), "INVALID_ARGUMENT",
         "at most 255 fit"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a", prompt_token_ids=[5], sampling=pb.SamplingParams(
            top_k=10 ** 6)), "INVALID_ARGUMENT", "top_k must be at most"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a", prompt_token_ids=[5], sampling=pb.SamplingParams(
            stop_token_ids=[99999])), "INVALID_ARGUMENT", "stop_token_ids [99999]"),
        (P + "Prefill", wpb.PrefillRequest(request_id="a", prompt_token_ids=[5], decode_group="elsewhere"),
         "FAILED_PRECONDITION", "no KV channels to decode group 'elsewhere'"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0"), "INVALID_ARGUMENT",
         "decode_tensor_parallel_size must be in [1, 64], got 0"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
            ch(decode_rank=3, host="h", port=5)]), "INVALID_ARGUMENT", "decode rank 3 of a group of 1"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
            ch(prefill_rank=2, host="h", port=5)]), "INVALID_ARGUMENT", "prefill rank 2 of a worker of 1"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
            ch(host="h", port=70000)]), "INVALID_ARGUMENT", "port must be in [1, 65535], got 70000"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1, channels=[
            ch(port=5)]), "INVALID_ARGUMENT", "channel host"),
        (P + "Connect", wpb.ConnectRequest(decode_group="d0", decode_tensor_parallel_size=1), "INVALID_ARGUMENT",
         "no channel address for decode rank 0"),
        (D + "Listen", wpb.ListenRequest(prefill_worker="p0", prefill_tensor_parallel_size=100), "INVALID_ARGUMENT",
         "prefill_tensor_parallel_size must be in [1, 64], got 100"),
        (D + "Listen", wpb.ListenRequest(prefill_tensor_parallel_size=1), "INVALID_ARGUMENT",
         "prefill_worker is empty"),
    ]


def bad_commands(system) -> list[tuple[wpb.SessionCommand, str, str]]:
    """Session commands each refused with (status, message), as a call of their own would have ended."""
    return [
        (decode_request(system, request_id="t1", transfer_timeout_s=float("inf")), "INVALID_ARGUMENT",
         "transfer_timeout_s must be in (0, 3600]"),
        (decode_request(system, request_id="t2", transfer_timeout_s=-1.0), "INVALID_ARGUMENT", "transfer_timeout_s"),
        (decode_request(system, request_id="v", prompt_token_ids=[4_000_000_000]), "INVALID_ARGUMENT",
         "outside the vocabulary"),
        (decode_request(system, request_id="\x00bad"), "INVALID_ARGUMENT", "printable"),
        (decode_request(system, request_id="", prompt_token_ids=[5]), "INVALID_ARGUMENT", "request_id is empty"),
        (decode_request(system, request_id="g", prefill_worker="ghost"), "FAILED_PRECONDITION",
         "no KV channels from prefill worker 'ghost'"),
        (first_token("nobody", 4_000_000_000), "INVALID_ARGUMENT",
         "first token id 4000000000 is outside the vocabulary"),
        (first_token("nobody", 3), "NOT_FOUND", "no reservation"),
        (wpb.SessionCommand(generate=wpb.LocalRequest(request_id="g", prompt_token_ids=[5], sampling=pb.SamplingParams(
            temperature=-1.0))), "INVALID_ARGUMENT", "temperature must be"),
        (wpb.SessionCommand(generate=wpb.LocalRequest(request_id="long", prompt_token_ids=[5] * 300)),
         "INVALID_ARGUMENT", "at most 255 fit"),
    ]


def test_every_field_is_validated(system, refs):
    for method, msg, code, message in bad_requests(system):
        got, details = call(address(system, method), method, msg.SerializeToString(), system.metadata)
        assert got == code and message in details, (method, msg, got, details)
    # Every bad command on one session: each refuses its own request, and the session serves on.
    session = SessionProbe(system.decode.address, system.metadata)
    for cmd, code, message in bad_commands(system):
        session.send(cmd)
        got, details = refused(session.wait(request_id(cmd)))
        assert got == code and message in details and "\n" not in details, (cmd, got, details)
        session.events.clear()
    session.send(wpb.SessionCommand(generate=wpb.LocalRequest(request_id="after", prompt_token_ids=PROMPTS[0],
                                                              sampling=pb.SamplingParams(**GREEDY))))
    assert session.wait("after").finished.finish_reason == "length" and session.tokens("after") == refs[0]
    assert not session.ended.is_set()
    session.close()
    assert session.error is None  # ended by us, not refused
    assert_serving(system, refs)


def test_set_first_token_outside_the_vocabulary_keeps_the_reservation(system, refs):
    session = SessionProbe(system.decode.address, system.metadata)
    session.send(decode_request(system, request_id="held"))
    session.wait("held", ("reserved",))
    session.send(first_token("held", 4_000_000_000))
    code, details = refused(session.wait("held", ("refused",)))
    assert code == "INVALID_ARGUMENT" and "outside the vocabulary [0, 384)" in details, details
    assert system.decode.loop.stats.remote == 1  # still reserved, awaiting its KV
    session.send(wpb.SessionCommand(cancel="held"))
    system.wait_free()
    session.close()
    assert_serving(system, refs)


def undecodable_bodies() -> list[bytes]:
    rng = random.Random(7)
    return [b"\xff\xff\xff\xff", bytes(rng.randrange(256) for _ in range(64)),
            b"\x0a\x02\xff\xfe",  # field 1 (a string everywhere here) holding invalid UTF-8
            b"\x22\x02\xc3\x28"]  # field 4: request_id of Generate, decode_group of Prefill: invalid UTF-8


@pytest.mark.parametrize("method", [GENERATE, P + "Prefill", P + "Connect", D + "Listen"])
def test_undecodable_requests_are_invalid_argument_with_one_log_line(system, refs, method, caplog):
    target = system.target if method == GENERATE else address(system, method)
    metadata = () if method == GENERATE else system.metadata
    for body in undecodable_bodies():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code, details = call(target, method, body, metadata)
            time.sleep(0.05)  # let the server thread's log record land
        if code == "OK" or "could not be parsed" not in details:
            continue  # these bytes happen to be a valid message of this method
        assert code == "INVALID_ARGUMENT" and details.startswith("request could not be parsed: "), details
        assert "\n" not in details and "Traceback" not in details
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and "could not be parsed" in records[0].getMessage(), records
        assert records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert all(call(target, method, b"\xff\xff\xff\xff", metadata)[0] == "INVALID_ARGUMENT" for _ in range(2))
    assert_serving(system, refs)


def session_probe(session: SessionProbe, body: bytes, n: int) -> tuple[str, str]:
    """(status, details) of one raw message of commands on `session`: the first refusal it caused, else OK.
    A sentinel command after it (a first token for no reservation, refused NOT_FOUND) marks its end."""
    before = len(session.events)
    session.send_bytes(body)
    sentinel = f"sentinel-{n}"
    session.send(first_token(sentinel, 3))
    session.wait(sentinel)
    ours = [e for e in session.events[before:] if e.request_id != sentinel and e.WhichOneof("kind") == "refused"]
    return refused(ours[0]) if ours else ("OK", "")


def test_undecodable_commands_are_refused_with_one_log_line_and_the_session_goes_on(system, refs, caplog):
    session = SessionProbe(system.decode.address, system.metadata)
    parsed = 0
    for n, body in enumerate(undecodable_bodies()):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            code, details = session_probe(session, body, n)
            time.sleep(0.05)
        if code == "OK":
            continue  # these bytes happen to be a valid message of commands
        parsed += 1
        assert code == "INVALID_ARGUMENT" and details.startswith("command could not be parsed: "), details
        assert "\n" not in details and "Traceback" not in details
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(records) == 1 and "could not be parsed" in records[0].getMessage(), records
        assert records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert parsed >= 2 and not session.ended.is_set()
    session.close()
    assert_serving(system, refs)


def fuzzed(rng: random.Random) -> tuple[str, bytes]:
    """A method and a request body: random bytes, or a valid message with random fields, mutated."""
    methods = [P + "Prefill", P + "Connect", P + "GetLoad", D + "Listen", "decode", "first_token", "generate",
               "cancel", D + "GetLoad"]  # the lower-case ones: commands on a session
    method = rng.choice(methods)
    if rng.random() < 0.4:
        return method, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
    big = lambda: rng.choice([0, 1, 5, 255, 256, 4_000_000_000, rng.randrange(2 ** 32)])  # noqa: E731
    ids = [big() for _ in range(rng.randrange(0, 6))]
    name = rng.choice(["", "x", "d0", "p0", "\u00e9t\u00e9", "a" * 300])
    sampling = pb.SamplingParams(max_tokens=rng.choice([0, 1, 3, 10 ** 6]), temperature=rng.choice([0.0, -1.0, 2.0]),
                                 top_k=rng.choice([0, 5, 10 ** 6]), stop_token_ids=[big() for _ in range(2)])
    msg = {P + "Prefill": lambda: wpb.PrefillRequest(request_id=name, prompt_token_ids=ids, sampling=sampling,
                                                    decode_group=rng.choice(["", "x"])),
           P + "Connect": lambda: wpb.ConnectRequest(decode_group=name, decode_tensor_parallel_size=big() % 70,
                                                     channels=[wpb.ChannelAddress(decode_rank=big(), prefill_rank=big(),
                                                                                  host=name, port=big())]),
           D + "Listen": lambda: wpb.ListenRequest(prefill_worker=name, prefill_tensor_parallel_size=big() + 65),
           "decode": lambda: wpb.SessionCommands(commands=[wpb.SessionCommand(decode=wpb.DecodeRequest(
               request_id=name, prompt_token_ids=ids, sampling=sampling, prefill_worker=rng.choice(["ghost", ""]),
               transfer_timeout_s=rng.choice([0.0, -5.0, 1e9])))]),
           "first_token": lambda: wpb.SessionCommands(commands=[wpb.SessionCommand(first_token=wpb.FirstToken(
               request_id=name, token_id=big()))]),
           "generate": lambda: wpb.SessionCommands(commands=[wpb.SessionCommand(generate=wpb.LocalRequest(
               request_id=name, prompt_token_ids=ids, sampling=sampling))]),
           "cancel": lambda: wpb.SessionCommands(commands=[wpb.SessionCommand(cancel=name)])}.get(
        method, wpb.LoadRequest)()
    body = bytearray(msg.SerializeToString())
    for _ in range(rng.randrange(0, 3)):  # flip a byte here and there: wrong tags, lengths and wire types too
        if body:
            body[rng.randrange(len(body))] = rng.randrange(256)
    return method, bytes(body)


def test_fuzzed_internal_requests_leave_the_system_serving(system, refs):
    rng = random.Random(1234)
    codes: dict[str, int] = {}
    session = SessionProbe(system.decode.address, system.metadata, timeout=600)  # one for every command
    for n in range(1000):
        method, body = fuzzed(rng)
        if method.startswith("/"):
            code, details = call(address(system, method), method, body, system.metadata, timeout=3.0)
        else:
            code, details = session_probe(session, body, n)
        codes[code] = codes.get(code, 0) + 1
        assert code not in ("UNKNOWN", "INTERNAL", "UNAUTHENTICATED"), (method, body, code, details)
        assert "\n" not in details and "Traceback" not in details, details
    assert codes.get("INVALID_ARGUMENT", 0) > 500, codes
    assert not session.ended.is_set()  # no command ended it
    session.close()  # aborts whatever fuzzed requests still run
    assert_serving(system, refs)
    assert system.router.published is True
