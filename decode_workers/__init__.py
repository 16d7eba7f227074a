"""The decode group: tensor-parallel ranks (one process each) that receive prompts' KV from prefill workers and
decode them with continuous batching. Rank 0 runs the scheduler, sampling and the group's gRPC service; the other
ranks follow its steps. `group` holds the process-level objects, `actor` their Ray wrapper."""
