"""Router request validation and the shared output processing (stop strings, hold-back): pure Python."""

from __future__ import annotations

import pytest

from engine.output_processor import OutputState
from engine.sampling_params import SamplingParams
from router.requests import ModelLimits, validate

LIMITS = ModelLimits("m", "LlamaForCausalLM", vocab_size=100, max_model_len=64, eos_token_ids=(2,))


def test_valid_token_prompt():
    spec = validate([5, 6, 7], {"max_tokens": 8, "temperature": 0.0}, "r1", LIMITS, None)
    assert spec.prompt_ids == [5, 6, 7] and spec.params.max_tokens == 8 and spec.params.greedy


@pytest.mark.parametrize("prompt,sampling,rid,message", [
    (None, {}, "r", "no prompt"),
    ([], {}, "r", "prompt is empty"),
    ("hello", {}, "r", "no tokenizer"),
    ([1, 100], {}, "r", "outside the vocabulary [0, 100)"),
    ([1] * 64, {"max_tokens": 1}, "r", "at most 63 fit"),
    ([1] * 60, {"max_tokens": 8}, "r", "lower max_tokens to at most 4"),
    ([1], {"top_k": -2}, "r", "top_k"),
    ([1], {"stop": ("x",)}, "r", "stop strings need the model's tokenizer"),
    ([1], {"stop_token_ids": (100,)}, "r", "stop_token_ids [100]"),
    ([1], {}, "x" * 129, "request_id"),
    ([1], {}, "a\nb", "request_id"),
])
def test_invalid_requests_say_what_to_fix(prompt, sampling, rid, message):
    with pytest.raises(ValueError, match=None) as e:
        validate(prompt, sampling, rid, LIMITS, None)
    assert message in str(e.value)


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i % 26); enough to drive the incremental detokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_output_state_holds_back_and_cuts_at_stop_strings():
    st = OutputState([0], SamplingParams(stop=("cde",)), CharTokenizer())
    assert st.holdback == 2
    assert st.add(1) is False and st.take(False) == ([1], "")  # "b" could start "cde"? no, but hold-back is 2
    assert st.add(2) is False and st.take(False) == ([2], "")  # "bc": both held back
    assert st.add(3) is False and st.take(False) == ([3], "b")
    assert st.add(4) is True and st.stopped  # "bcde": stop matched, text cut before it
    assert st.text == "b" and st.take(True) == ([4], "")
    assert st.add(5) is False and st.token_ids == [1, 2, 3, 4]  # nothing is taken after the stop


def test_output_state_without_stop_streams_every_char():
    st = OutputState([0], SamplingParams(), CharTokenizer())
    out = []
    for t in (7, 4, 11, 11, 14):
        st.add(t)
        out.append(st.take(False)[1])
    assert out == ["h", "e", "l", "l", "o"] and not st.flush()


def test_deploy_examples_parse_and_the_serve_config_validates(tmp_path):
    import os

    import yaml

    from deploy.config import ServeConfig

    root = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "examples")
    for name in ("ray-cluster.yaml", "kuberay-cluster.yaml"):
        docs = list(yaml.safe_load_all(open(os.path.join(root, name))))
        assert docs and all(isinstance(d, dict) for d in docs)
    kwargs = ServeConfig.from_file(os.path.join(root, "serve.yaml"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = ServeConfig(**{**kwargs, "model": str(model)})
    assert (cfg.prefill_workers, cfg.decode_groups, cfg.decode_tp, cfg.max_num_seqs) == (2, 1, 2, 128)
    assert cfg.router_config().max_queued_requests == 256
