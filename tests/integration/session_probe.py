"""A raw `DecodeGroup.Session` for tests: commands (or any bytes) in, every SessionEvents message out, read on a
thread so a test can wait for one request's event while others stream."""

from __future__ import annotations

import queue
import threading
import time

import grpc

from protos import worker_pb2 as wpb

SESSION = "/kvrelay.internal.v1.DecodeGroup/Session"


class SessionProbe:
    """Mutates: the messages and events it has read."""

    def __init__(self, target: str, metadata, timeout: float = 120.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._out: queue.Queue[bytes | None] = queue.Queue()

        def commands():
            while (body := self._out.get()) is not None:
                yield body

        self._call = self._channel.stream_stream(SESSION, request_serializer=lambda b: b,
                                                 response_deserializer=wpb.SessionEvents.FromString)(
            commands(), metadata=metadata, timeout=timeout)
        self.messages: list[wpb.SessionEvents] = []
        self.events: list[wpb.SessionEvent] = []
        self.error: grpc.RpcError | None = None  # how the session ended, once it did with a status
        self.ended = threading.Event()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                with self._cond:
                    self.messages.append(msg)
                    self.events.extend(msg.events)
                    self._cond.notify_all()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()
            with self._cond:
                self._cond.notify_all()

    def send(self, *commands: wpb.SessionCommand) -> None:
        """All `commands` as one message."""
        self._out.put(wpb.SessionCommands(commands=list(commands)).SerializeToString())

    def send_bytes(self, body: bytes) -> None:
        self._out.put(body)

    def wait(self, rid: str, kinds: tuple[str, ...] = ("finished", "refused"),
             timeout: float = 30.0) -> wpb.SessionEvent:
        """The first event of request `rid` of one of `kinds`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ev = next((e for e in self.events if e.request_id == rid and e.WhichOneof("kind") in kinds), None)
                if ev is not None:
                    return ev
                if self.ended.is_set():
                    raise AssertionError(f"the session ended ({self.error}) before {kinds} of {rid!r}")
                left = deadline - time.monotonic()
                assert left > 0, f"no {kinds} of {rid!r} within {timeout} s: {self.events}"
                self._cond.wait(left)

    def of(self, rid: str) -> list[wpb.SessionEvent]:
        with self._cond:
            return [e for e in self.events if e.request_id == rid]

    def tokens(self, rid: str) -> list[int]:
        """Request `rid`'s tokens, by their indexes."""
        out: list[int] = []
        for e in self.of(rid):
            if e.WhichOneof("kind") == "tokens":
                del out[e.tokens.start_index:]
                out.extend(e.tokens.token_ids)
        return out

    def close(self) -> None:
        """End the router's side of the stream (the group aborts what is left) and wait for the end."""
        self._out.put(None)
        self.ended.wait(30)
        self._channel.close()


def refused(ev: wpb.SessionEvent) -> tuple[str, str]:
    assert ev.WhichOneof("kind") == "refused", ev
    return ev.refused.code, ev.refused.message


def generate(rid: str, prompt: list[int], **sampling) -> wpb.SessionCommand:
    from protos import generation_pb2 as pb

    return wpb.SessionCommand(generate=wpb.LocalRequest(request_id=rid, prompt_token_ids=prompt,
                                                        sampling=pb.SamplingParams(**sampling)))
