"""Client streams on threads, for tests that disturb a deployment while requests are in flight (drain, restarts)."""

from __future__ import annotations

import threading
from typing import Any

from client import Client


class Streams:
    """One stream per prompt, each on a thread; `wait_started` returns once every one has its first tokens.
    `tokens[i]` collects stream i's tokens, `errors[i]` whatever ended it early."""

    def __init__(self, target: str, prompts: list[Any], params: list[dict[str, Any]]) -> None:
        self.prompts, self.params = prompts, params
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.errors: list[BaseException | None] = [None] * len(prompts)
        self.firsts = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(target, i), daemon=True) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _run(self, target: str, i: int) -> None:
        try:
            with Client(target, timeout=120) as c:
                for n, chunk in enumerate(c.stream(self.prompts[i], **self.params[i])):
                    self.tokens[i].extend(chunk.token_ids)
                    if n == 0:
                        self.firsts.release()
        except BaseException as e:
            self.errors[i] = e
            self.firsts.release()

    def wait_started(self) -> None:
        for _ in self.prompts:
            assert self.firsts.acquire(timeout=60)

    def join(self) -> None:
        for t in self.threads:
            t.join(150)
            assert not t.is_alive()
