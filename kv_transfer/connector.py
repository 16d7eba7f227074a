"""The worker side of KV transfer: one `KVConnector` per rank, loaded as the engine's worker extension.

Sender role (prefill ranks): `connect` to a decode group's ranks (a serving worker: `start_connect`, which forms
the channels on a thread of its own, then `connect_state` between steps installs them); then in every step that
finishes the prefill of requests marked for transfer, send the header and table at the step's start and each
layer's blocks from the runner's per-layer hook, so layer l travels while layer l+1 computes. The step ends when
every send completed (so the prefill blocks can be freed); failures are reported per request.

Receiver role (decode ranks): `listen` for a prefill worker (one channel and one thread per sending rank);
`expect` registers a request's destination blocks before the prefill side may send. Threads write arriving
layers into those blocks, only while the request is still registered (under a lock, so a `cancel` is final:
no byte lands after it returns). Landed and failed requests are reported through `poll`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.channel import DTYPE_CODES, HEADER_WORDS, MAGIC, ChannelClosed, KVChannel, transfer_key
from kv_transfer.layout import HeadSlice, TransferPlan, make_transfer_plan


@dataclass
class _Expected:
    request_id: str
    peer: str
    dst: torch.Tensor  # [num_blocks] int64 destination block ids on this rank
    parts: int  # channels (sending ranks) that must each deliver every layer
    done: int = 0


@dataclass
class _OutChannel:
    channel: KVChannel
    slices: list[HeadSlice]
    works: list[Any] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)  # buffers alive until their sends complete
    error: str | None = None  # a send failed this step: the rest of the step skips it, end_step drops it

    def send(self, t: torch.Tensor) -> None:
        """Queue a send; a failure (the receiver is gone) marks the channel instead of failing the whole step,
        so only the transfers on this channel fail."""
        if self.error is not None:
            return
        try:
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


class KVConnector:
    # A receiver waits this long for a sender's next message; the sender's keepalive (every 30 s from the engine
    # loop) keeps an idle channel well inside it.
    idle_timeout_s = 3600.0

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
        # receiver role
        self.expected: dict[int, _Expected] = {}
        self.landed: list[str] = []
        self.failed: dict[str, str] = {}
        self.in_channels: dict[tuple[str, int], KVChannel] = {}
        self.dead_peers: dict[str, str] = {}
        self.generation: dict[str, int] = {}  # per peer: bumped by each listen; older channels' failures are moot
        self.threads: list[threading.Thread] = []
        # sender role
        self.out: dict[str, dict[int, _OutChannel]] = {}  # peer -> decode rank -> channel
        # (peer, all source block ids of the step's transfers to it, [(key, request id, src blocks)])
        self.step_sends: list[tuple[str, torch.Tensor, list[tuple[int, str, torch.Tensor]]]] = []
        self.connecting: dict[str, _PendingConnect] = {}  # ticket -> a connect whose channels are forming
        self.closed = False
        self.bytes_sent = 0  # KV payload bytes, headers excluded (what `stats` reports)
        self.bytes_received = 0

    # ================= receiver role =================
    def listen(self, peer: str, prefill_tp: int) -> dict[int, tuple[str, int]]:
        """Open one store per prefill rank that sends to this rank; returns {prefill rank: (host, port)}. Listening
        again for the same peer (re-wiring a broken pair) replaces its channels."""
        plan = make_transfer_plan(self.num_kv_heads, prefill_tp, self.tp_size)
        with self.lock:
            gen = self.generation[peer] = self.generation.get(peer, 0) + 1
            old = [k for k in self.in_channels if k[0] == peer]
        for key in old:
            self.in_channels.pop(key).close()
        addrs = {}
        for src in plan.sources(self.rank):
            try:
                store = KVChannel.listen(self.host, self.timeout_s)
            except Exception as e:  # not a dead rank: a DistError would stop the engine loop
                raise RuntimeError(f"could not open a KV channel store on {self.host}: {e}") from None
            addrs[src] = (self.host, store.port)
            slices = [s for s in plan.slices[self.rank] if s.src_rank == src]
            t = threading.Thread(target=self._serve, args=(peer, src, store, slices, gen), daemon=True,
                                 name=f"kv-recv-{peer}-{src}")
            t.start()
            self.threads.append(t)
        self.dead_peers.pop(peer, None)
        return addrs

    def expect(self, request_id: str, dst_blocks: list[int], peer: str, prefill_tp: int) -> None:
        parts = len(make_transfer_plan(self.num_kv_heads, prefill_tp, self.tp_size).sources(self.rank))
        with self.lock:
            if peer in self.dead_peers:
                self.failed[request_id] = self.dead_peers[peer]
                return
            self.expected[transfer_key(request_id)] = _Expected(
                request_id, peer, torch.tensor(dst_blocks, dtype=torch.int64, device=self.device), parts)

    def cancel(self, request_ids: list[str]) -> None:
        """After this returns, no data for these requests is written (their blocks may be reused)."""
        with self.lock:
            for rid in request_ids:
                self.expected.pop(transfer_key(rid), None)
                self.failed.pop(rid, None)
            self.landed = [r for r in self.landed if r not in request_ids]

    def poll(self) -> dict[str, Any]:
        """Drain events: {"landed": [request ids], "failed": {request id: error}}."""
        with self.lock:
            out = {"landed": self.landed, "failed": self.failed}
            self.landed, self.failed = [], {}
        return out

    def _fail_peer(self, peer: str, error: str, gen: int) -> None:
        with self.lock:
            if self.closed or self.generation.get(peer) != gen:
                return  # closing down, or a channel already replaced by a newer listen
            self.dead_peers[peer] = error
            for key, e in list(self.expected.items()):
                if e.peer == peer:
                    del self.expected[key]
                    self.failed[e.request_id] = error

    def _serve(self, peer: str, src: int, store: Any, slices: list[HeadSlice], gen: int) -> None:
        if self.device.type == "cuda":
            # This thread's receives and scatters run on its own stream, synchronised by the host before anything
            # is reported: an idle receive must never make the engine's stream wait.
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(torch.cuda.Stream(self.device))
        try:
            ch = KVChannel(store, KVChannel.RECEIVER, self.device, self.idle_timeout_s)
        except Exception as e:
            self._fail_peer(peer, f"KV channel from prefill worker {peer!r} rank {src} did not form: {e}", gen)
            return
        with self.lock:
            if self.generation.get(peer) != gen:
                ch.close()  # replaced while it formed
                return
            self.in_channels[(peer, src)] = ch
        try:
            while not self.closed:
                self._receive_step(ch, peer, slices)
        except ChannelClosed as e:
            self._fail_peer(peer, f"KV transfer from prefill worker {peer!r} rank {src} failed: {e}", gen)
        except Exception:
            self._fail_peer(peer, f"KV receiver for {peer!r} rank {src} crashed:\n{traceback.format_exc()}", gen)
        finally:
            ch.close()

    def _receive_step(self, ch: KVChannel, peer: str, slices: list[HeadSlice]) -> None:
        hdr = ch.recv_now((HEADER_WORDS,), torch.int64).tolist()
        magic, n, layers, total, heads, head_dim, block_size, dtype_code = hdr
        if magic == MAGIC and n == 0:
            return  # the sender's keepalive: the channel is idle, not dead
        want = (self.kv.shape[1], sum(s.num for s in slices), self.kv.shape[5], self.kv.shape[3],
                DTYPE_CODES[self.kv.dtype])
        if magic != MAGIC or (layers, heads, head_dim, block_size, dtype_code) != want:
            raise ChannelClosed(f"KV layout mismatch: got header {hdr}, this rank expects "
                                f"(layers, heads, head_dim, block_size, dtype) = {want}")
        table = ch.recv_now((2 * n,), torch.int64).view(n, 2).tolist()
        # Bind each transfer to its registration now: a request id cancelled and reserved again meanwhile (or
        # expected from another peer) is a different registration and must not receive this data.
        targets, off = [], 0
        with self.lock:
            for key, nb in table:
                e = self.expected.get(key)
                if e is not None and e.peer == peer and e.dst.numel() == nb:
                    targets.append((e, key, off, nb))
                off += nb
        # Post every layer's receive at once: the transport fills them in order while this thread (which needs
        # the GIL, shared with the engine loop) only waits and scatters. [2, total, block_size, heads, head_dim]
        bufs = [torch.empty((2, total, block_size, heads, head_dim), dtype=self.kv.dtype, device=self.device)
                for _ in range(layers)]
        works = [ch.recv(b) for b in bufs]
        for layer, (buf, work) in enumerate(zip(bufs, works)):
            ch.finish(work)
            self.bytes_received += buf.numel() * buf.element_size()
            bufs[layer] = None  # type: ignore[call-overload]  # release staging as soon as it is scattered
            with self.lock:
                for e, key, o, nb in targets:
                    if self.expected.get(key) is not e:
                        continue  # cancelled meanwhile: its blocks may belong to someone else now
                    h = 0
                    for s in slices:
                        self.kv[:, layer, e.dst, :, s.dst_start:s.dst_start + s.num] = buf[:, o:o + nb, :, h:h + s.num]
                        h += s.num
                if self.device.type == "cuda":  # the writes are done before the lock is released (cancel is final)
                    torch.cuda.current_stream(self.device).synchronize()
        with self.lock:
            for e, key, _, _ in targets:
                if self.expected.get(key) is not e:
                    continue
                e.done += 1
                if e.done == e.parts:
                    del self.expected[key]
                    self.landed.append(e.request_id)

    # ================= sender role =================
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
        """Announce this step's transfers (rows of `out.transfers`: prompts completing this step whose KV goes
        to a decode group)."""
        by_peer: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
        bs = self.kv.shape[3]
        for row, (transfer, table) in out.transfers.items():
            nb = -(-(out.starts[row] + out.num_tokens[row]) // bs)
            rid = out.request_ids[row]
            skip = int(transfer.get("skip_blocks", 0))  # the receiver's prefix cache holds these
            src = torch.tensor(table[skip:nb], dtype=torch.int64, device=self.device)
            by_peer.setdefault(transfer["peer"], []).append((transfer_key(rid), rid, src))
        self.step_sends = []
        for peer, items in by_peer.items():
            self.step_sends.append((peer, torch.cat([x[2] for x in items]), items))
            for ch in self.out.get(peer, {}).values():
                total = sum(int(x[2].numel()) for x in items)
                hdr = torch.tensor([MAGIC, len(items), self.kv.shape[1], total, sum(s.num for s in ch.slices),
                                    self.kv.shape[5], bs, DTYPE_CODES[self.kv.dtype]], dtype=torch.int64,
                                   device=self.device)
                table = torch.tensor([v for k, _, src in items for v in (k, int(src.numel()))], dtype=torch.int64,
                                     device=self.device)
                ch.send(hdr)
                ch.send(table)

    def on_layer(self, layer: int) -> None:
        for peer, src, _ in self.step_sends:
            chans = self.out.get(peer, {})
            if not chans:
                continue
            blocks = self.kv[:, layer, src]  # [2, total, block_size, local heads, head_dim], gathered once
            for ch in chans.values():
                parts = [blocks[:, :, :, s.src_start:s.src_start + s.num] for s in ch.slices]
                data = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)).contiguous()
                ch.send(data)
                self.bytes_sent += data.numel() * data.element_size()

    def stats(self) -> dict[str, int]:
        """KV payload bytes this rank sent and received so far."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}

    def end_step(self, out: Any) -> dict[str, Any]:
        """Wait for this step's sends; returns {"sent": [ids], "failed": {id: error}} and, on a rank that receives,
        the transfers that landed or failed since the last step ({"landed": [ids], "recv_failed": {id: error}}),
        so that a decode group learns of them with its step's result rather than by polling."""
        sent, failed = [], {}
        for peer, _, items in self.step_sends:
            chans = self.out.get(peer)
            error = None if chans else f"no KV channel to decode group {peer!r} (connect first)"
            for d, ch in list((chans or {}).items()):
                try:
                    self._complete(ch.works)
                    if ch.error is not None:
                        raise ChannelClosed(ch.error)
                except Exception as e:
                    error = f"KV send to decode group {peer!r} rank {d} failed: {e}"
                    ch.channel.close()
                    chans.pop(d)
                ch.works, ch.keep = [], []
            for _, rid, _ in items:
                if error:
                    failed[rid] = error
                else:
                    sent.append(rid)
        self.step_sends = []
        events: dict[str, Any] = {"sent": sent, "failed": failed}
        if self.generation:  # this rank receives (listen was called)
            polled = self.poll()
            events["landed"], events["recv_failed"] = polled["landed"], polled["failed"]
        return events

    def abort_step(self, out: Any) -> None:
        """The forward failed mid-step: channels that carried part of this step are out of step with their
        receivers, so close them (the receivers fail those transfers) and forget them."""
        for peer, _, _ in self.step_sends:
            for d, ch in list(self.out.get(peer, {}).items()):
                if ch.works:
                    ch.channel.close()
                    del self.out[peer][d]
        self.step_sends = []

    def keepalive(self) -> None:
        """Between steps: an empty step header on every outgoing channel, so that an idle pair's pre-posted
        receive never reaches its timeout (the receiver skips it). A channel that cannot take it is dropped."""
        for chans in self.out.values():
            for d, ch in list(chans.items()):
                hdr = torch.tensor([MAGIC, 0, self.kv.shape[1], 0, sum(s.num for s in ch.slices), self.kv.shape[5],
                                    self.kv.shape[3], DTYPE_CODES[self.kv.dtype]], dtype=torch.int64,
                                   device=self.device)
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

    def close(self) -> None:
        self.closed = True
        for chans in self.out.values():
            for ch in chans.values():
                ch.channel.close()
        for ch in self.in_channels.values():
            ch.close()
