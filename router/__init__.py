"""The router: kvrelay's gRPC front door. It validates and tokenizes requests, picks a prefill worker (longest
cached prefix, then load) and a decode group (free KV blocks, then load), orchestrates prefill -> KV transfer ->
decode over the internal control API, detokenizes and applies stop strings, and streams tokens to the client."""
