"""The FastAPI application: routes, the API-key check, and failures as OpenAI error JSON. /health and /metrics
need no key (probes and Prometheus scrapers); every /v1 route does when the server has one."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from router.errors import INTERNAL, INVALID_ARGUMENT, NOT_FOUND, RequestError
from router.http.chat import create_chat_completion
from router.http.completions import create_completion
from router.http.errors import error_response
from router.http.frontend import Frontend
from router.metrics import CONTENT_TYPE


def build_app(front: Frontend) -> FastAPI:
    app = FastAPI(title="kvrelay", description="OpenAI-compatible API of a kvrelay deployment", docs_url=None,
                  redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> Response:
        return error_response(front.intake.refused(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        code = NOT_FOUND if e.status_code == 404 else INVALID_ARGUMENT
        message = (f"there is no {request.method} {request.url.path} here: the API is /v1/completions, "
                   "/v1/chat/completions, /v1/models, /health and /metrics") if e.status_code in (404, 405) \
            else str(e.detail)
        r = error_response(RequestError(code, message))
        r.status_code = e.status_code
        return r

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        return error_response(front.intake.refused(RequestError(INVALID_ARGUMENT, str(e))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        """A bug in the router: OpenAI's error JSON (clients parse it), counted as INTERNAL. Starlette re-raises
        `e` after this answers, so uvicorn logs the traceback."""
        return error_response(front.intake.refused(RequestError(
            INTERNAL, f"internal error in the router: {type(e).__name__}: {e}")))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(front, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(front, request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        front.authorize(request)
        limits = front.intake.limits
        return JSONResponse({"object": "list", "data": [{
            "id": front.model_name, "object": "model", "created": started, "owned_by": "kvrelay",
            "root": limits.model, "max_model_len": limits.max_model_len, "vocab_size": limits.vocab_size}]})

    @app.get("/health")
    async def health() -> Response:
        ok, why = front.healthy()
        return JSONResponse({"status": "ok"} if ok else {"status": "unavailable", "reason": why},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(front.intake.metrics.exposition(), media_type=CONTENT_TYPE)

    return app
