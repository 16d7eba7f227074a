"""SamplingParams and config validation, HF config parsing, and the torch-free import boundary."""

import json
import subprocess
import sys

import pytest

from engine.config import CacheConfig, SchedulerConfig
from engine.models.hf_config import CheckpointError, load_model_config
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, msg", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
])
def test_invalid_sampling_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_sampling_params_normalises():
    p = SamplingParams(stop="###", stop_token_ids=[5], top_k=-1, temperature=0)
    assert p.stop == ("###",) and p.stop_token_ids == (5,) and p.effective_top_k == 0 and p.greedy
    hash(p)


@pytest.mark.parametrize("cls, kwargs", [
    (CacheConfig, dict(block_size=12)), (CacheConfig, dict(num_blocks=0)),
    (CacheConfig, dict(gpu_memory_utilization=1.5)),
    (SchedulerConfig, dict(max_num_seqs=0)),
    (SchedulerConfig, dict(enable_chunked_prefill=False, max_num_batched_tokens=8, max_model_len=64)),
])
def test_invalid_configs(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def write(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **cfg}))
    return str(tmp_path)


def test_old_and_new_rope_formats(tmp_path):
    old = load_model_config(write(tmp_path, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    new = load_model_config(write(tmp_path, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert old.rope == new.rope and old.rope.kind == "llama3" and old.rope.theta == 500000.0
    lin = load_model_config(write(tmp_path, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (lin.rope.kind, lin.rope.factor, lin.rope.theta) == ("linear", 2.0, 10000.0)


def test_derived_fields(tmp_path):
    c = load_model_config(write(tmp_path, num_key_value_heads=1, head_dim=32, eos_token_id=[2, 3],
                                tie_word_embeddings=True, torch_dtype="bfloat16"))
    assert (c.num_kv_heads, c.head_dim, c.eos_token_ids, c.tie_word_embeddings, c.dtype) == (
        1, 32, (2, 3), True, "bfloat16")
    assert c.kv_bytes_per_token == 2 * 2 * 1 * 32 * 2
    q = load_model_config(write(tmp_path, architectures=["Qwen2ForCausalLM"]), dtype="float32")
    assert q.qkv_bias and not q.o_bias and q.num_kv_heads == 4 and q.head_dim == 16


@pytest.mark.parametrize("cfg, msg", [
    (dict(architectures=["GPT2LMHeadModel"]), "not supported"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (dict(num_key_value_heads=3), "multiple"),
])
def test_unsupported_checkpoints(tmp_path, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        load_model_config(write(tmp_path, **cfg))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        load_model_config(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing required field 'vocab_size'"):
        cfg = dict(BASE)
        del cfg["vocab_size"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        load_model_config(str(tmp_path))


def test_pure_python_modules_do_not_import_torch():
    code = ("import sys, engine, engine.config, engine.sampling_params, engine.scheduler, engine.kv_cache, "
            "engine.models.hf_config; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_engine_process_switch(monkeypatch, tmp_path):
    """On by default; KVRELAY_ENGINE_PROCESS overrides the config; `kvrelay serve --no-engine-process` and the
    config key turn it off."""
    from deploy import cli
    from engine.config import RuntimeConfig

    assert RuntimeConfig().resolved("cpu").engine_process is True
    monkeypatch.setenv("KVRELAY_ENGINE_PROCESS", "0")
    assert RuntimeConfig().resolved("cpu").engine_process is False
    monkeypatch.setenv("KVRELAY_ENGINE_PROCESS", "1")
    assert RuntimeConfig(engine_process=False).resolved("cpu").engine_process is True
    monkeypatch.setenv("KVRELAY_ENGINE_PROCESS", "maybe")
    with pytest.raises(ValueError, match="KVRELAY_ENGINE_PROCESS='maybe': use 1/0"):
        RuntimeConfig().resolved("cpu")
    (tmp_path / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr("deploy.serve.serve", lambda cfg: seen.append(cfg.runtime_config()) or 0)
    assert cli.main(["serve", "--model", str(tmp_path)]) == 0
    assert cli.main(["serve", "--model", str(tmp_path), "--no-engine-process"]) == 0
    (tmp_path / "serve.json").write_text(json.dumps({"model": str(tmp_path), "engine_process": False}))
    assert cli.main(["serve", "--config", str(tmp_path / "serve.json")]) == 0
    assert [r.engine_process for r in seen] == [True, False, False]
