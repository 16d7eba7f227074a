"""The prefill worker: runs prompts (batched, prefix-cached, chunked), streams their KV layer by layer to decode
groups, and returns each prompt's first token. `PrefillWorker` is the process-level object; `actor` wraps it
for Ray."""
