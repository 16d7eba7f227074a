"""The worker side of KV transfer: one `KVConnector` per rank, loaded as the engine's worker extension.

It is both roles over one rank's KV cache: `KVSender` (prefill ranks: channels to decode groups, each step's
chunks sent layer by layer in bounded pieces) and `KVReceiver` (decode ranks: channels from prefill workers,
arriving pieces scattered into reserved blocks). The wire format is kv_transfer.wire's; which blocks go where is
decided by the engine's scheduler (`TransferChunk`s in the step, reservations on the decode side), and a pair's
compatibility (model, dtype, block size, wire version) is checked before its channels open (engine.config.KVLayout).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from engine.scheduler_output import TransferEvents
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender


class KVConnector(KVReceiver, KVSender):
    def __init__(self, ctx: Any, host: str | None = None, timeout_s: float = 60.0) -> None:
        self.rank, self.tp_size = ctx.rank, ctx.tp_size
        self.kv: torch.Tensor = ctx.kv_cache  # [2, layers, blocks, block_size, local kv heads, head_dim]
        self.num_kv_heads = ctx.model_config.num_kv_heads
        self.device = self.kv.device
        # The address this rank's TCPStores advertise to senders: its node's address in a cluster (a deployment
        # sets KVRELAY_KV_HOST in each worker process), loopback on one machine.
        self.host = host or os.environ.get("KVRELAY_KV_HOST", "127.0.0.1")
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.closed = False
        self._init_receiver()
        self._init_sender()

    def stats(self) -> dict[str, int]:
        """KV payload bytes this rank sent and received so far, and the most a step's receive staging took."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "max_staging_bytes": self.max_staging_bytes}

    def end_step(self, out: Any) -> TransferEvents:
        """Wait for this step's sends; report them, and on a rank that receives the transfers that landed or
        failed since the last report, so a decode group learns of them with its step's result, not by polling."""
        sent, failed = self._end_sends()
        polled = self.poll() if self.generation else TransferEvents()  # generation: listen was called
        return TransferEvents(sent, failed, polled.landed, polled.recv_failed)

    def close(self) -> None:
        self.closed = True
        for chans in self.out.values():
            for ch in chans.values():
                ch.channel.close()
        for ch in self.in_channels.values():
            ch.close()
