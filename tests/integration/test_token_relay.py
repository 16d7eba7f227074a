"""Decode events carry coalesced tokens and their logprobs aligned; the router's relay skips the first token (it
came from the prefill worker) and pairs every later token with its own logprob."""

from __future__ import annotations

import asyncio

from decode_workers.session import tokens_message
from engine.outputs import Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from protos import codec
from router.client_stream import ClientStream, relay
from router.requests import RequestSpec
from router.worker_api import Finished, Tokens


def output(tokens: list[int], new: int, lps: int) -> RequestOutput:
    """A step's delta: of the request's `tokens` so far the last `new` are new; the last `lps` tokens have logprobs
    (as on a decode group, where the first token's logprob is the prefill worker's)."""
    with_lp = tokens[len(tokens) - lps:]
    return RequestOutput("r", tokens[-new:], num_output_tokens=len(tokens),
                         new_logprobs=[Logprob(t, -0.1 * t, [(t, -0.1 * t)]) for t in tokens[-new:] if t in with_lp])


def test_coalesced_outputs_keep_logprobs_aligned():
    # admission emits the first token (no logprob here), then two decode steps coalesce with it
    msg = tokens_message([output([10], 1, 0), output([10, 11], 1, 1), output([10, 11, 12], 1, 2)])
    assert msg.start_index == 0 and list(msg.token_ids) == [10, 11, 12]
    assert [round(x.logprob, 3) for x in msg.logprobs] == [-1.1, -1.2]  # the last two tokens'
    msg = tokens_message([output([10, 11, 12, 13], 1, 3)])
    assert msg.start_index == 3 and list(msg.token_ids) == [13] and round(msg.logprobs[0].logprob, 3) == -1.3


def test_relay_skips_the_first_token_and_pairs_logprobs():
    spec = RequestSpec("r", [1, 2], SamplingParams(max_tokens=8, logprobs=1))
    out = ClientStream(spec, None)
    out.add(10, (-1.0, [(10, -1.0)]))  # the first token, from the prefill worker

    async def events():
        msg = tokens_message([output([10], 1, 0), output([10, 11], 1, 1), output([10, 11, 12], 1, 2)])
        yield Tokens(msg.start_index, list(msg.token_ids), [codec.logprob_fields(x) for x in msg.logprobs])
        yield Finished("length", "")

    async def run():
        return [c async for c in relay(events(), "g", out)]

    chunks = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == [10, 11, 12] and out.reason == "length"
    assert [(lp.token_id, round(lp.logprob, 3)) for lp in out.state.logprobs] == [(10, -1.0), (11, -1.1), (12, -1.2)]


def test_relay_coalesces_what_came_while_the_client_was_slow():
    """One decode message per token, read while the client writes: the chunks carry several tokens each, and
    tokens and text are exactly those of one chunk per token."""
    from deploy import DEFAULT_MODEL_DIR
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    ids = tok.encode("Ünïcödé: café, naïve, 東京, 😀 emoji, ß and Ωmega. Return a list of the arguments.")
    prompt, completion = ids[:2], ids[2:]
    spec = RequestSpec("r", prompt, SamplingParams(max_tokens=len(completion)))

    async def events():
        for i, t in enumerate(completion):
            await asyncio.sleep(0)  # each message its own read, as from the wire
            yield Tokens(i, [t], [])
        yield Finished("length", "")

    async def run(slow: bool) -> list:
        out, chunks = ClientStream(spec, tok), []
        async for c in relay(events(), "g", out):
            chunks.append(c)
            if slow:
                await asyncio.sleep(0.002)  # a client write that takes a while
        assert out.reason == "length"
        return chunks

    fast, slow = asyncio.run(run(False)), asyncio.run(run(True))
    for chunks in (fast, slow):
        assert [t for c in chunks for t in c.token_ids] == completion
        assert "".join(c.text for c in chunks) == tok.decode(ids)[len(tok.decode(prompt)):]
    assert len(fast) >= len(completion) - 1 and len(slow) <= len(completion) // 4
