"""The router's OpenAI-compatible HTTP front (FastAPI on uvicorn, in the router's own event loop): /v1/completions,
/v1/chat/completions, /v1/models, /health and /metrics, on the same intake and orchestrator as the gRPC API."""
