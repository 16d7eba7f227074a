"""`kvrelay bench`: load tests of a running kvrelay endpoint through the client SDK.

Open loop (Poisson or gamma arrivals at a rate) or closed loop (fixed concurrency) over a generated or ShareGPT
workload; client-side TTFT, TPOT, inter-token and end-to-end latency, throughput, prefix-cache hit rate and goodput
under SLOs; a rate sweep for the highest rate meeting the SLOs. Entry point: `bench.load.cli:main`.
Measurement definitions follow vLLM's benchmark_serving (see docs/load-testing.md).
"""
