"""bench/load/openai_backend.py's pure parts: status names of the error events OpenAI-compatible servers send
inside a stream (OpenAI and kvrelay: string codes and types; vLLM: the HTTP status as an integer code)."""

from __future__ import annotations

import pytest

from bench.load.openai_backend import error_name


@pytest.mark.parametrize("error,name", [
    ({"message": "m", "type": "BadRequestError", "code": 400}, "INVALID_ARGUMENT"),  # vLLM
    ({"message": "m", "type": "InternalServerError", "code": 503}, "UNAVAILABLE"),  # vLLM: the code wins
    ({"message": "m", "type": "x", "code": "429"}, "RESOURCE_EXHAUSTED"),
    ({"message": "m", "type": "requests", "code": "rate_limit_exceeded"}, "RESOURCE_EXHAUSTED"),  # OpenAI, kvrelay
    ({"message": "m", "type": "invalid_request_error", "code": "context_length_exceeded"}, "INVALID_ARGUMENT"),
    ({"message": "m", "type": "invalid_request_error", "code": None}, "INVALID_ARGUMENT"),  # kvrelay's 400
    ({"message": "m", "type": "server_error", "code": None}, "INTERNAL"),
    ({"message": "m", "type": "something_new", "code": "also_new"}, "SERVER_ERROR"),
    ({"message": "m", "code": 418}, "HTTP_418"),
])
def test_stream_error_events_get_status_names(error, name):
    assert error_name(error) == name
