"""A one-way KV channel: a private 2-rank torch.distributed group between one prefill rank and one decode rank.

The receiver hosts a TCPStore on a free port and publishes (host, port) through the control plane; the sender
connects. No global world: either side can die without tearing down other channels or its own TP group.

The messages it carries are kv_transfer.wire's.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class ChannelClosed(RuntimeError):
    """The peer went away or the channel broke; every transfer on it fails."""


class KVChannel:
    SENDER, RECEIVER = 0, 1

    def __init__(self, store: dist.Store, role: int, device: torch.device, timeout_s: float) -> None:
        self.role, self.peer = role, 1 - role
        self.device = device
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = dist.PrefixStore("kvrelay/kv", store)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(prefix, role, 2, opts)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, role, 2, timeout)
        self.store = store  # keep the rendezvous alive as long as the group
        # Set by `close`. A gloo group's shutdown() leaves its connections working (torch 2.13), so a closed
        # channel must refuse work itself: a pair closed on a failure never carries another step.
        self.closed = False

    @staticmethod
    def listen(host: str, timeout_s: float) -> dist.TCPStore:
        """Receiver side: a store on a free port (read `.port`); the group forms once the sender connects."""
        return dist.TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @staticmethod
    def connect(host: str, port: int, timeout_s: float) -> dist.TCPStore:
        return dist.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=timeout_s))

    def send(self, t: torch.Tensor) -> dist.Work:
        if self.closed:
            raise ChannelClosed("the KV channel was closed on this side")
        return self.pg.send([t], self.peer, 0)

    def recv(self, t: torch.Tensor) -> dist.Work:
        if self.closed:
            raise ChannelClosed("the KV channel was closed on this side")
        return self.pg.recv([t], self.peer, 0)

    def finish(self, work: dist.Work) -> None:
        """Block *this host thread* until `work` completed. On NCCL, `Work.wait()` only makes the current CUDA
        stream wait, so the calling thread must run on its own stream (`stream`) and synchronise it."""
        try:
            work.wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as e:  # gloo raises when the peer closes or the group times out
            raise ChannelClosed(f"KV channel broke while receiving: {e}") from e

    def recv_now(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.finish(self.recv(t))
        return t

    def close(self) -> None:
        self.closed = True
        try:
            self.pg.abort() if self.device.type == "cuda" else self.pg.shutdown()
        except Exception:
            pass
