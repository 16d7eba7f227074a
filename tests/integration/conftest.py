"""Integration fixtures: one real kvrelay deployment (Ray + gRPC, on CPU) shared by the tests that need it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served():
    pytest.importorskip("ray")
    from serving import start_serving

    s = start_serving()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def kvrelay_target(served) -> str:
    """"host:port" of a running deployment on the embedded default model (decode TP 2, float32, CPU)."""
    return served.target
