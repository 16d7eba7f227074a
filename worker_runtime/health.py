"""What a worker reports about itself: its load (blocks, queues, preemptions, KV layout) and whether it is
healthy, read from its engine loop's latest stats without a call into the loop, so that a poll never waits
behind a step. `protos.codec.load_message` turns the fields into the wire message."""

from __future__ import annotations

from typing import Any

from engine.config import KVLayout
from protos.codec import one_line
from worker_runtime.handle import EngineHandle

# A step or engine call running longer than this means the worker is stuck (no real step takes minutes).
STUCK_S = 300.0


def health_error(loop: EngineHandle) -> str:
    """Why the worker is unhealthy as one line ("" when healthy): its engine failed, or is stuck in one step
    or call (a tensor-parallel rank hung)."""
    if loop.error:
        return one_line(loop.error)
    stuck = loop.stuck_for()
    if stuck > STUCK_S:
        return f"its engine has been inside one step or call for {stuck:.0f} s (a rank hung?)"
    return ""


def load_fields(name: str, loop: EngineHandle, draining: bool = False) -> dict[str, Any]:
    """The fields of the worker's `WorkerLoad` message, from the loop's last published stats (`draining`: it is
    scaling down, worker_runtime.drain)."""
    s, cfg = loop.stats, loop.config
    error = health_error(loop)
    return dict(name=name, num_blocks=s.num_blocks, free_blocks=s.free_blocks, block_size=cfg.cache.block_size,
                running=s.running, waiting=s.waiting + s.remote, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
                healthy=not error, error=error, max_num_seqs=cfg.scheduler.max_num_seqs,
                num_preemptions=s.num_preemptions, kv_layout=vars(KVLayout.of(cfg)).copy(),
                draining=draining)

