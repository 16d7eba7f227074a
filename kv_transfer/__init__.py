"""Moving KV blocks from prefill workers to decode ranks: layout maps (pure Python) and channels over
torch.distributed (NCCL on GPU, gloo on CPU), one private 2-rank group per (prefill rank, decode rank) pair."""
