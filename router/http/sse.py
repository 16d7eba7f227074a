"""Server-sent events as OpenAI streams them: each chunk a `data: <json>` event ended by a blank line, and a
final `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
# Proxies must pass events through as they come (nginx buffers responses unless told not to).
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> str:
    # Compact separators: these are sent once per token chunk.
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
