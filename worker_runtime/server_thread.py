"""A grpc.aio server on an asyncio loop of its own thread: how a worker (a Ray actor whose methods block, or a
test) serves its gRPC service next to an engine loop without giving the actor's thread to asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

import grpc

from protos.guards import SERVER_OPTIONS, server_interceptors


class AsyncServerThread:
    """Mutates: its own thread and loop. `start()` binds `host:port` (0 = any free port) and returns the port.
    Every call must carry `secret` (protos.guards); undecodable requests get INVALID_ARGUMENT."""

    def __init__(self, add_services: Callable[[grpc.aio.Server], None], secret: str, host: str = "127.0.0.1",
                 port: int = 0, name: str = "grpc") -> None:
        self._add_services, self.host, self.port = add_services, host, port
        self._interceptors = server_interceptors(secret)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"kvrelay-{name}-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> int:
        self._thread.start()
        return self.run(self._start())

    async def _start(self) -> int:
        self._server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=self._interceptors)
        self._add_services(self._server)
        wanted = f"{self.host}:{self.port}"
        self.port = self._server.add_insecure_port(wanted)
        if not self.port:
            raise OSError(f"could not bind a gRPC server to {wanted} (port in use?)")
        await self._server.start()
        return self.port

    def run(self, coro: object, timeout_s: float | None = 60.0) -> object:
        """Run a coroutine on the server's loop from another thread and wait for its value."""
        fut: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout_s)

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (in-flight calls get `grace_s` to finish, then are cancelled). Idempotent."""
        if not self.loop.is_running():
            return
        if self._server is not None:
            self.run(self._server.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def node_ip() -> str:
    """This node's address as Ray sees it (what other nodes reach), or loopback outside Ray."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        return "127.0.0.1"
