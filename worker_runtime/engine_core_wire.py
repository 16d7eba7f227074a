"""What crosses between a worker's service process and its engine core process (`worker_runtime.engine_core`).

Two ZeroMQ channels. Service -> core: commands (`Call`, `Stop`), rare and small, pickled (their arguments are
SamplingParams, dicts, transfers). Core -> service, in order on one channel: `Ready` (after the engine is built,
or `Failed`), `Reply` to each call, `Step` once per engine step with every request's outputs and the stats after
it (the hot message: msgpack through msgspec's typed decoder, no pickle), `Beat` while the core lives (how long its
loop has been inside one step or call) and `Dead` when its loop died. A reply is sent before the outputs of the
step that follows it, as in the engine loop's own order.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgspec

from engine.engine_loop import EngineStats
from engine.outputs import RequestOutput


class Ready(msgspec.Struct, tag="ready", array_like=True):
    config: bytes  # the engine's EngineConfig, pickled (its pool size is known only once the engine is built)
    stats: EngineStats


class Failed(msgspec.Struct, tag="failed", array_like=True):
    error: bytes  # the exception that kept the engine from being built, pickled (see `reply`)
    traceback: str


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call_id: int
    ok: bool
    value: bytes  # pickled: the operation's value, or the exception it raised (`ok` false)


class Step(msgspec.Struct, tag="step", array_like=True):
    outputs: list[RequestOutput]  # every request's outputs of one step
    stats: EngineStats


class Beat(msgspec.Struct, tag="beat", array_like=True):
    stuck_s: float  # how long the core's loop has been inside its current step or call (0: between them)


class Dead(msgspec.Struct, tag="dead", array_like=True):
    error: str  # the engine loop's error (it stopped after a failed step)


Event = Ready | Failed | Reply | Step | Beat | Dead
encode = msgspec.msgpack.Encoder().encode
decode_event = msgspec.msgpack.Decoder(Event).decode


def pack_command(*command: Any) -> bytes:
    """("call", call_id, op, args) or ("stop",)."""
    return pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_command(data: bytes) -> tuple:
    return pickle.loads(data)


def reply(call_id: int, ok: bool, value: Any) -> bytes:
    """A call's answer (its value, or the exception it raised)."""
    return encode(Reply(call_id, ok, pickle_value(value, not ok)))


def pickle_value(value: Any, is_error: bool) -> bytes:
    """Pickled; an exception that does not survive pickling comes back as RuntimeError with its type and text
    (the services map ValueError, KeyError, EngineDead and RuntimeError, which all do)."""
    try:
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)  # some exceptions pickle but do not unpickle (required arguments)
        return payload
    except Exception:
        if not is_error:
            raise
        return pickle.dumps(RuntimeError(f"{type(value).__name__}: {value}"))
