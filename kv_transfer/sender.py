"""The sending side of KV transfer (prefill ranks), a part of `KVConnector`.

`connect` to a decode group's ranks (a serving worker: `start_connect`, which forms the channels on a thread of
its own, then `connect_state` between steps installs them). In every step whose rows send KV (the scheduler's
`TransferChunk`s: each chunk of a chunked prefill as it is computed), the header and table go out at the step's
start and each layer's blocks from the runner's per-layer hook, in pieces of bounded size, so layer l travels
while layer l+1 computes. At most MAX_OUTSTANDING pieces per channel are in flight (older ones are waited for
first), so the sender's staging is bounded too. The step ends when every send completed; failures are reported per
request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.channel import ChannelClosed, KVChannel
from kv_transfer.layout import HeadSlice, TransferPlan, make_transfer_plan
from kv_transfer.wire import DTYPE_CODES, PIECE_TOKENS, Entry, Header, pack_table, transfer_key

MAX_OUTSTANDING = 4  # payload pieces in flight per channel


@dataclass
class _OutChannel:
    channel: KVChannel
    slices: list[HeadSlice]
    works: list[Any] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)  # buffers alive until their sends complete
    error: str | None = None  # a send failed this step: the rest of the step skips it, end_step drops it

    def send(self, t: torch.Tensor, complete: Any = None) -> None:
        """Queue a send; a failure (the receiver is gone) marks the channel instead of failing the whole step,
        so only the transfers on this channel fail. With `complete` (the sender's wait), at most MAX_OUTSTANDING
        sends stay in flight: the oldest is waited for first."""
        if self.error is not None:
            return
        try:
            if complete is not None and len(self.works) >= MAX_OUTSTANDING:
                complete(self.works[:1])
                del self.works[0], self.keep[0]
            self.works.append(self.channel.send(t))
            self.keep.append(t)
        except Exception as e:
            self.error = str(e)


@dataclass
class _PendingConnect:
    peer: str
    chans: dict[int, _OutChannel] = field(default_factory=dict)
    error: str = ""
    done: bool = False
    installed: bool = False
    abandoned: bool = False


@dataclass
class _PeerStep:
    """One step's sends to one decode group: all source blocks back to back, and the table's entries."""

    peer: str
    src: torch.Tensor  # [total blocks] int64 prefill-side block ids
    entries: list[Entry]
    request_ids: list[str]
    header: Header


class KVSender:
    """Mutates: its channels and the step's pending sends."""

    kv: torch.Tensor
    device: torch.device
    lock: threading.Lock
    timeout_s: float

    def _init_sender(self) -> None:
        self.out: dict[str, dict[int, _OutChannel]] = {}  # peer -> decode rank -> channel
        self.step_sends: list[_PeerStep] = []
        self.connecting: dict[str, _PendingConnect] = {}  # ticket -> a connect whose channels are forming
        self.bytes_sent = 0  # KV payload bytes, headers excluded (what `stats` reports)

    def connect(self, peer: str, decode_tp: int, addresses: list[dict[int, tuple[str, int]]],
                timeout_s: float | None = None) -> None:
        """`start_connect` and wait for it, blocking the caller: for tools and tests that own the engine. A
        serving worker uses `start_connect` and `connect_state`, so its engine loop never waits on a peer."""
        ticket = f"blocking-{time.monotonic_ns()}"
        self.start_connect(peer, decode_tp, addresses, ticket, timeout_s)
        pending = self.connecting[ticket]
        while not pending.done:
            time.sleep(0.002)
        error = self.connect_state(ticket)
        self.connect_state(ticket, forget=True)
        if error:
            raise RuntimeError(f"could not connect to decode group {peer!r}: {error}")

    def start_connect(self, peer: str, decode_tp: int, addresses: list[dict[int, tuple[str, int]]], ticket: str,
                      timeout_s: float | None = None) -> None:
        """Start joining the channels decode group `peer` opened for this rank (addresses[d][my rank] = (host,
        port)) on a thread of its own: the TCPStore connect and the group's rendezvous block until the peer
        answers or `timeout_s` passes, and must never block a step. `ticket` (the caller's, unique) names it
        in `connect_state`. The pair's current channels keep serving until the new ones are ready; a failed
        connect changes nothing."""
        plan: TransferPlan = make_transfer_plan(self.num_kv_heads, self.tp_size, decode_tp)
        targets = {}
        for d, slices in plan.sends_of(self.rank).items():
            if d >= len(addresses) or self.rank not in addresses[d]:
                raise ValueError(f"no channel address for decode rank {d} from prefill rank {self.rank}")
            targets[d] = (*addresses[d][self.rank], slices)
        pending = _PendingConnect(peer)
        with self.lock:
            if ticket in self.connecting:
                raise ValueError(f"a KV connect with ticket {ticket!r} is already under way")
            self.connecting[ticket] = pending
        threading.Thread(target=self._open, args=(pending, targets, timeout_s or self.timeout_s), daemon=True,
                         name=f"kv-connect-{peer}").start()

    def _open(self, pending: _PendingConnect, targets: dict[int, tuple[str, int, list[HeadSlice]]],
              timeout_s: float) -> None:
        chans: dict[int, _OutChannel] = {}
        try:
            for d, (host, port, slices) in targets.items():
                store = KVChannel.connect(host, port, timeout_s)
                chans[d] = _OutChannel(KVChannel(store, KVChannel.SENDER, self.device, self.timeout_s), slices)
        except Exception as e:  # the caller's error, not this worker's: its other channels and steps go on
            for ch in chans.values():
                ch.channel.close()
            chans = {}
            pending.error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        with self.lock:
            pending.chans, pending.done = chans, True
            if pending.abandoned:  # the caller gave up waiting: nobody will install these
                for ch in chans.values():
                    ch.channel.close()

    def connect_state(self, ticket: str, forget: bool = False) -> str | None:
        """Between steps: None while a `start_connect` is under way, "" once it succeeded (its channels replace
        the pair's old ones at the first such call, with no step in flight on them), else why it failed.
        `forget` drops the ticket; one not yet installed is abandoned (the channels it may still form are
        closed)."""
        with self.lock:
            pending = self.connecting.get(ticket)
            if pending is None:
                return f"no KV connect under way with ticket {ticket!r}"
            if forget:
                del self.connecting[ticket]
                if not pending.installed:
                    pending.abandoned = True
                    for ch in pending.chans.values():
                        ch.channel.close()
                return "" if pending.installed else pending.error or "abandoned"
            if not pending.done:
                return None
            if pending.error or pending.installed:
                return pending.error
            pending.installed = True
        for old in self.out.pop(pending.peer, {}).values():  # re-wiring a pair replaces its channels
            old.channel.close()
        self.out[pending.peer] = pending.chans
        return ""

    def begin_step(self, out: Any) -> None:
        """Announce this step's transfers (`out.transfers`: rows whose chunk sends KV to a decode group)."""
        by_peer: dict[str, list[tuple[str, Any]]] = {}
        for row, chunk in out.transfers.items():
            by_peer.setdefault(chunk.peer, []).append((out.request_ids[row], chunk))
        bs = self.kv.shape[3]
        self.step_sends = []
        for peer, items in by_peer.items():
            src = torch.tensor([b for _, c in items for b in c.src_blocks], dtype=torch.int64, device=self.device)
            entries = [Entry(transfer_key(rid), len(c.src_blocks), c.dst_offset, c.final) for rid, c in items]
            step = _PeerStep(peer, src, entries, [rid for rid, _ in items], Header(
                len(items), self.kv.shape[1], int(src.numel()), 0, self.kv.shape[5], bs, DTYPE_CODES[self.kv.dtype],
                max(1, PIECE_TOKENS // bs)))
            self.step_sends.append(step)
            for ch in self.out.get(peer, {}).values():
                heads = sum(s.num for s in ch.slices)
                ch.send(Header(**{**vars(step.header), "heads": heads}).pack(self.device))
                ch.send(pack_table(entries, self.device))

    def on_layer(self, layer: int) -> None:
        for step in self.step_sends:
            chans = self.out.get(step.peer, {})
            for a, b in step.header.pieces():
                if not chans:
                    break
                blocks = self.kv[:, layer, step.src[a:b]]  # [2, piece blocks, block_size, local heads, head_dim]
                for ch in chans.values():
                    parts = [blocks[:, :, :, s.src_start:s.src_start + s.num] for s in ch.slices]
                    data = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)).contiguous()
                    ch.send(data, self._complete)
                    self.bytes_sent += data.numel() * data.element_size()

    def _end_sends(self) -> tuple[list[str], dict[str, str]]:
        """Wait for this step's sends: (request ids sent, {request id: error})."""
        sent, failed = [], {}
        for step in self.step_sends:
            chans = self.out.get(step.peer)
            error = None if chans else f"no KV channel to decode group {step.peer!r} (connect first)"
            for d, ch in list((chans or {}).items()):
                try:
                    self._complete(ch.works)
                    if ch.error is not None:
                        raise ChannelClosed(ch.error)
                except Exception as e:
                    error = f"KV send to decode group {step.peer!r} rank {d} failed: {e}"
                    ch.channel.close()
                    chans.pop(d)
                ch.works, ch.keep = [], []
            for rid in step.request_ids:
                if error:
                    failed[rid] = error
                else:
                    sent.append(rid)
        self.step_sends = []
        return sent, failed

    def abort_step(self, out: Any) -> None:
        """The forward failed mid-step: channels that carried part of this step are out of step with their
        receivers, so close them (the receivers fail those transfers) and forget them."""
        for step in self.step_sends:
            for d, ch in list(self.out.get(step.peer, {}).items()):
                if ch.works:
                    ch.channel.close()
                    del self.out[step.peer][d]
        self.step_sends = []

    def keepalive(self) -> None:
        """Between steps: an empty step header on every outgoing channel, so that an idle pair's pre-posted
        receive never reaches its timeout (the receiver skips it). A channel that cannot take it is dropped."""
        for chans in self.out.values():
            for d, ch in list(chans.items()):
                hdr = Header(0, self.kv.shape[1], 0, sum(s.num for s in ch.slices), self.kv.shape[5],
                             self.kv.shape[3], DTYPE_CODES[self.kv.dtype], 1).pack(self.device)
                try:
                    self._complete([ch.channel.send(hdr)])
                except Exception:
                    ch.channel.close()
                    chans.pop(d)

    def _complete(self, works: list[Any]) -> None:
        """Wait on the host until the sends completed (NCCL's wait() alone only orders CUDA streams), within the
        timeout; on expiry the caller aborts the channel."""
        if self.device.type != "cuda":
            for w in works:
                w.wait()
            return
        deadline = time.monotonic() + self.timeout_s
        for w in works:
            while not w.is_completed():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"KV send did not complete within {self.timeout_s:.0f} s")
                time.sleep(0.0002)

