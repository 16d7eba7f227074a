"""Router request validation and the shared output processing (stop strings, hold-back): pure Python."""

from __future__ import annotations

import pytest

from engine.output_processor import OutputState
from engine.sampling_params import SamplingParams
from router.requests import FieldError, ModelLimits, validate

LIMITS = ModelLimits("m", "LlamaForCausalLM", vocab_size=100, max_model_len=64, eos_token_ids=(2,))


def test_valid_token_prompt():
    spec = validate([5, 6, 7], {"max_tokens": 8, "temperature": 0.0}, "r1", LIMITS, None)
    assert spec.prompt_ids == [5, 6, 7] and spec.params.max_tokens == 8 and spec.params.greedy


@pytest.mark.parametrize("prompt,sampling,rid,message,param", [
    (None, {}, "r", "no prompt", "prompt"),
    ([], {}, "r", "prompt is empty", "prompt"),
    ("hello", {}, "r", "no tokenizer", "prompt"),
    ([1, 100], {}, "r", "prompt token ids [100] are outside the vocabulary [0, 100)", "prompt"),
    ([1] * 64, {"max_tokens": 1}, "r", "the prompt has 64 tokens; at most 63 fit", "prompt"),
    ([1] * 60, {"max_tokens": 8}, "r", "lower max_tokens to at most 4", "max_tokens"),
    ([1], {"max_tokens": 0}, "r", "max_tokens must be an integer >= 1, got 0", "max_tokens"),
    ([1], {"temperature": -1.0}, "r", "temperature must be a finite number >= 0", "temperature"),
    ([1], {"top_k": -2}, "r", "top_k must be an integer >= 0", "top_k"),
    ([1], {"top_p": 0.0}, "r", "top_p must be in (0, 1], got 0.0", "top_p"),
    ([1], {"seed": -3}, "r", "seed must be a non-negative integer, got -3", "seed"),
    ([1], {"stop": ("",)}, "r", "stop must be non-empty strings", "stop"),
    ([1], {"stop_token_ids": (-1,)}, "r", "stop_token_ids must be non-negative", "stop_token_ids"),
    ([1], {"logprobs": 21}, "r", "logprobs must be an integer in [0, 20], got 21", "logprobs"),
    # Two bad fields: the message and the param are the first one's (field order), as SamplingParams checks them.
    ([1], {"logprobs": 21, "temperature": -1.0}, "r", "temperature must be", "temperature"),
    ([1], {"stop": ("x",)}, "r", "stop strings need the model's tokenizer", "stop"),
    ([1], {"stop_token_ids": (100,)}, "r", "stop_token_ids [100]", "stop_token_ids"),
    ([1], {}, "x" * 129, "request_id", "request_id"),
    ([1], {}, "a\nb", "request_id", "request_id"),
])
def test_invalid_requests_say_what_to_fix_and_name_the_field(prompt, sampling, rid, message, param):
    with pytest.raises(FieldError) as e:
        validate(prompt, sampling, rid, LIMITS, None)
    assert isinstance(e.value, ValueError) and message in str(e.value) and e.value.param == param


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


def test_client_errors_are_one_line_causes():
    from router.errors import INTERNAL, RequestError

    tb = ("engine failed:\nTraceback (most recent call last):\n  File \"engine/runner.py\", line 3, in step\n"
          "    x = y[0]\nIndexError: list index out of range\n")
    e = RequestError(INTERNAL, f"decode group d0 aborted the request: {tb}")
    assert e.message == "decode group d0 aborted the request: engine failed: IndexError: list index out of range"
    assert str(e) == e.message and "\n" not in RequestError(INTERNAL, "a\n  b").message
