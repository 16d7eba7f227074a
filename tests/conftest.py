"""Shared fixtures: small random checkpoints, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integration"))

from checkpoints import make_checkpoint  # noqa: E402

# name -> (architecture, config overrides). Each exercises one feature the engine must reproduce exactly.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("llama", {}),
    "llama_mqa": ("llama", dict(num_key_value_heads=1)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_theta=50000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "head_dim_32": ("llama", dict(head_dim=32)),
    "llama_attn_bias": ("llama", dict(attention_bias=True)),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral_window": ("mistral", dict(sliding_window=40)),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            arch, overrides = VARIANTS[name]
            made[name] = make_checkpoint(str(root / name), arch, **overrides)
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(checkpoint_dir):
    return checkpoint_dir("llama_gqa")


@pytest.fixture(scope="session")
def served():
    """One real kvrelay deployment (Ray + gRPC, on CPU) shared by the integration tests that need it."""
    pytest.importorskip("ray")
    from serving import start_serving

    s = start_serving()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def kvrelay_target(served) -> str:
    """"host:port" of a running deployment on the embedded default model (decode TP 2, float32, CPU)."""
    return served.target


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    """Leave with pytest's exit status once it has reported everything, without the interpreter's teardown: the
    in-process KV engines' receiver threads may still sit in a gloo receive (closing a channel does not interrupt
    it on torch 2.13), and finalising the interpreter under them can abort the process after a green run."""
    if _EXIT_STATUS and os.environ.get("KVRELAY_TEST_NO_FAST_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])
