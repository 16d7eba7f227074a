"""The tests' real kvrelay deployment: Ray actors (1 prefill worker, 1 decode group of TP 2) on the embedded default
model in float32 with small pools, the router in this process (deploy.inprocess)."""

from __future__ import annotations

from deploy import DEFAULT_MODEL_DIR
from deploy.config import ServeConfig
from deploy.inprocess import Served, serve_in_process

# Small pools and few seats, so the tests can fill them: RESOURCE_EXHAUSTED and queueing are reachable.
TEST_SERVE = dict(model=DEFAULT_MODEL_DIR, dtype="float32", decode_tp=2, host="127.0.0.1", port=0,
                  prefill_num_blocks=96, decode_num_blocks=96, max_num_seqs=4, max_queued_requests=3,
                  max_model_len=512, queue_timeout_s=20.0, transfer_timeout_s=20.0, device="cpu")


__all__ = ["TEST_SERVE", "Served", "start_serving"]


def start_serving(supervise: bool = False, **overrides) -> Served:
    """The test deployment (TEST_SERVE with `overrides`); `supervise` as deploy.inprocess.serve_in_process."""
    return serve_in_process(ServeConfig(**{**TEST_SERVE, **overrides}), supervise)
