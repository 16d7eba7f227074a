"""Serving the HTTP front with uvicorn inside the router's event loop (the orchestrator's gRPC channels and
state belong to that loop). The socket is bound here, so port 0 picks a free port; uvicorn's own signal
handling is off: the process that runs the router owns Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


class HttpServer:
    """Mutates: its socket and serving task."""

    def __init__(self, app: FastAPI, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"could not bind the HTTP API to {host}:{port} ({e.strerror}; port in use?)") from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=2)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="kvrelay-http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()
