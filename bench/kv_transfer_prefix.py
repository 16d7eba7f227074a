"""KV bytes and time of a shared-prefix multi-turn workload, with and without decode-side prefix sharing
(`python -m bench.kv_transfer --workload shared-prefix`; here in one process: a prefill engine and a decode engine
wired by the KV connector, on two GPUs or on CPU over gloo).

`--conversations` conversations share one `--system-len` system prompt; each turn appends a `--turn-len` user
message to the conversation so far (prompt and replies) and generates `--gen` tokens. Every turn is one request:
the decode engine reserves its blocks, the prefill engine computes it (its own prefix cache skips what it holds)
and sends the KV, then the decode engine decodes. With sharing the decode engine's prefix cache supplies the blocks
it still holds (the system prompt, earlier turns) and only the rest is sent; without it (prefix caching off on the
decode side) every turn's whole prompt travels. Greedy tokens must be the same both ways.
"""

from __future__ import annotations

import random
import time
from typing import Any


def run(model_dir: str, args: Any, sharing: bool) -> dict:
    from engine import EngineConfig, LLMEngine, RuntimeConfig, SamplingParams

    def make(device: str, caching: bool) -> LLMEngine:
        return LLMEngine(EngineConfig.from_model_dir(
            model_dir, dtype=args.dtype, device=device, load_format="dummy",
            worker_extension="kv_transfer.connector:KVConnector", num_blocks=args.num_blocks,
            max_model_len=args.max_model_len, enable_prefix_caching=caching,
            runtime=RuntimeConfig(async_scheduling=False)))

    cuda = args.device == "cuda"
    p, d = make("cuda:0" if cuda else "cpu", True), make("cuda:1" if cuda else "cpu", sharing)
    try:
        d_tp = d.config.parallel.tensor_parallel_size
        p.call_extension("connect", "d0", d_tp, d.call_extension("listen", "p0", 1))
        rng = random.Random(0)
        vocab = p.config.model.vocab_size
        system = [rng.randrange(3, vocab) for _ in range(args.system_len)]
        convs = [list(system) for _ in range(args.conversations)]
        params = SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True)
        sent = p.call_extension("stats")[0]["bytes_sent"]
        outputs, reused, t0 = [], 0, time.perf_counter()
        for turn in range(args.turns):
            for c, conv in enumerate(convs):
                conv += [rng.randrange(3, vocab) for _ in range(args.turn_len)]
                rid = f"c{c}t{turn}"
                r = d.reserve_remote_prefill(rid, conv, params, "p0", 1)
                assert r is not None, "the decode pool is too small for one turn"
                reused += r.num_cached_blocks
                p.add_request(rid, conv, params, transfer={"peer": "d0", "skip_blocks": r.num_cached_blocks})
                first = _finish(p, rid)
                d.set_first_token(rid, first.token_ids[0])
                out = _finish(d, rid)
                outputs.append(out.token_ids)
                conv += out.token_ids
        seconds = time.perf_counter() - t0
        return dict(sharing=sharing, requests=len(outputs), seconds=seconds,
                    bytes_sent=p.call_extension("stats")[0]["bytes_sent"] - sent, blocks_reused=reused,
                    tokens=outputs)
    finally:
        p.shutdown()
        d.shutdown()


def _finish(eng: Any, rid: str) -> Any:
    while True:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                assert o.error is None, o.error
                return o


def report(model_dir: str, args: Any) -> list[dict]:
    rows = [run(model_dir, args, sharing) for sharing in (False, True)]
    if rows[0].pop("tokens") != rows[1].pop("tokens"):
        raise SystemExit("decode-side sharing changed the tokens")
    base = rows[0]["bytes_sent"]
    for r in rows:
        r["bytes_vs_no_sharing"] = r["bytes_sent"] / base if base else float("nan")
    print(f"\nshared-prefix multi-turn KV transfer: {args.conversations} conversations x {args.turns} turns, system "
          f"{args.system_len} + {args.turn_len} per turn, {args.gen} generated")
    print(f"{'decode sharing':>14} {'requests':>8} {'MiB sent':>9} {'of none':>7} {'blocks reused':>13} {'seconds':>8}")
    for r in rows:
        print(f"{'on' if r['sharing'] else 'off':>14} {r['requests']:>8} {r['bytes_sent'] / 2**20:>9.2f} "
              f"{r['bytes_vs_no_sharing']:>7.1%} {r['blocks_reused']:>13} {r['seconds']:>8.2f}")
    return rows
