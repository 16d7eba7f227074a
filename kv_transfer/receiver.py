"""The receiving side of KV transfer (decode ranks), a part of `KVConnector`.

`listen` for a prefill worker opens one channel and one thread per sending rank; `expect` registers a request's
destination blocks before the prefill side may send. Each thread receives steps as they come: per layer, pieces of
bounded size into two staging buffers in turn (one being scattered while the next arrives), scattered into the
registered blocks only while the request is still registered (under a lock, so a `cancel` is final: no byte lands
after it returns). A request has landed when every sending rank delivered its final chunk; landed and failed
requests are reported through `poll`.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from engine.scheduler_output import TransferEvents
from kv_transfer.channel import ChannelClosed, KVChannel
from kv_transfer.layout import HeadSlice, make_transfer_plan
from kv_transfer.wire import DTYPE_CODES, HEADER_WORDS, TABLE_WORDS, Header, WireError, transfer_key, unpack_table


@dataclass
class _Expected:
    request_id: str
    peer: str
    dst: torch.Tensor  # [num_blocks] int64: where the prompt's blocks after the shared prefix go on this rank
    parts: int  # channels (sending ranks) that must each deliver the final chunk
    done: int = 0


class KVReceiver:
    """Mutates (under `lock`): expected/landed/failed registrations, channels, and the KV blocks it writes."""

    # A receiver waits this long for a sender's next message; the sender's keepalive (every 30 s from the engine
    # loop) keeps an idle channel well inside it.
    idle_timeout_s = 3600.0
    kv: torch.Tensor
    device: torch.device
    lock: threading.Lock
    closed: bool

    def _init_receiver(self) -> None:
        self.expected: dict[int, _Expected] = {}
        self.landed: list[str] = []
        self.failed: dict[str, str] = {}
        self.in_channels: dict[tuple[str, int], KVChannel] = {}
        self.dead_peers: dict[str, str] = {}
        self.generation: dict[str, int] = {}  # per peer: bumped by each listen; older channels' failures are moot
        self.threads: list[threading.Thread] = []
        self.bytes_received = 0
        self.max_staging_bytes = 0  # the most one step's receive staging took (bounded by two pieces)

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

    def expect_many(self, batch: list[tuple[str, list[int], str, int]]) -> None:
        """`expect` for each (request id, destination blocks, peer, prefill tp): one call per step on a group."""
        for request_id, dst_blocks, peer, prefill_tp in batch:
            self.expect(request_id, dst_blocks, peer, prefill_tp)

    def cancel(self, request_ids: list[str]) -> None:
        """After this returns, no data for these requests is written (their blocks may be reused)."""
        with self.lock:
            for rid in request_ids:
                self.expected.pop(transfer_key(rid), None)
                self.failed.pop(rid, None)
            self.landed = [r for r in self.landed if r not in request_ids]

    def poll(self) -> TransferEvents:
        """Drain what landed and what failed since the last poll."""
        with self.lock:
            out = TransferEvents(landed=self.landed, recv_failed=self.failed)
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
        except (ChannelClosed, WireError) as e:
            self._fail_peer(peer, f"KV transfer from prefill worker {peer!r} rank {src} failed: {e}", gen)
        except Exception:
            self._fail_peer(peer, f"KV receiver for {peer!r} rank {src} crashed:\n{traceback.format_exc()}", gen)
        finally:
            ch.close()

    def _receive_step(self, ch: KVChannel, peer: str, slices: list[HeadSlice]) -> None:
        hdr = Header.unpack(ch.recv_now((HEADER_WORDS,), torch.int64).tolist())
        if hdr.transfers == 0:
            return  # the sender's keepalive: the channel is idle, not dead
        want = (self.kv.shape[1], sum(s.num for s in slices), self.kv.shape[5], self.kv.shape[3],
                DTYPE_CODES[self.kv.dtype])
        got = (hdr.layers, hdr.heads, hdr.head_dim, hdr.block_size, hdr.dtype_code)
        if got != want:
            raise WireError(f"KV layout mismatch: got (layers, heads, head_dim, block_size, dtype) = {got}, this "
                            f"rank expects {want}")
        entries = unpack_table(ch.recv_now((TABLE_WORDS * hdr.transfers,), torch.int64).tolist())
        # Bind each transfer to its registration now: a request id cancelled and reserved again meanwhile (or
        # expected from another peer) is a different registration and must not receive this data.
        targets, off = [], 0  # (registration, key, payload offset, entry)
        with self.lock:
            for entry in entries:
                e = self.expected.get(entry.key)
                if e is not None and e.peer == peer and entry.dst_offset + entry.blocks <= e.dst.numel():
                    targets.append((e, entry.key, off, entry))
                off += entry.blocks
        pieces = [(layer, a, b) for layer in range(hdr.layers) for a, b in hdr.pieces()]
        rows = min(hdr.piece_blocks, hdr.total_blocks)
        per_block = hdr.block_size * hdr.heads * hdr.head_dim
        # Two staging buffers in turn, each up to one piece: the next piece arrives while this one is scattered;
        # whatever the step carries, staging stays two pieces. Flat, so a short piece's view is contiguous.
        flat = [torch.empty(2 * rows * per_block, dtype=self.kv.dtype, device=self.device)
                for _ in range(min(2, len(pieces)))]
        self.max_staging_bytes = max(self.max_staging_bytes, sum(t.numel() * t.element_size() for t in flat))

        def view(i: int) -> torch.Tensor:  # [2, blocks of piece i, block_size, heads, head_dim]
            n = pieces[i][2] - pieces[i][1]
            return flat[i % 2][:2 * n * per_block].view(2, n, hdr.block_size, hdr.heads, hdr.head_dim)

        works = [ch.recv(view(i)) for i in range(len(flat))]
        for i, (layer, a, b) in enumerate(pieces):
            ch.finish(works[i % 2])
            buf = view(i)
            self.bytes_received += buf.numel() * buf.element_size()
            with self.lock:
                for e, key, o, entry in targets:
                    lo, hi = max(a, o), min(b, o + entry.blocks)
                    if lo >= hi or self.expected.get(key) is not e:
                        continue  # not in this piece, or cancelled meanwhile (its blocks may be someone else's)
                    dst = e.dst[entry.dst_offset + lo - o:entry.dst_offset + hi - o]
                    h = 0
                    for s in slices:
                        self.kv[:, layer, dst, :, s.dst_start:s.dst_start + s.num] = \
                            buf[:, lo - a:hi - a, :, h:h + s.num]
                        h += s.num
                if self.device.type == "cuda":  # the writes are done before the lock is released (cancel is final)
                    torch.cuda.current_stream(self.device).synchronize()
            if i + 2 < len(pieces):
                works[i % 2] = ch.recv(view(i + 2))
        with self.lock:
            for e, key, _, entry in targets:
                if not entry.final or self.expected.get(key) is not e:
                    continue
                e.done += 1
                if e.done == e.parts:
                    del self.expected[key]
                    self.landed.append(e.request_id)
