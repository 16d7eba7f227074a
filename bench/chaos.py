"""Chaos benchmark: closed-loop load on a local Ray deployment while a random worker is SIGKILLed every few seconds.

    python -m bench.chaos                                   # 2 min, a kill every 20 s, 8 clients
    python -m bench.chaos --minutes 1 --kill-every-s 15 --out r.json

Bounded in time (--minutes, then the clients stop) and requests (--max-requests), local only (starts its own Ray).
The deployment is supervised as `kvrelay serve` is: a killed prefill actor or decode rank (its group restarts
whole) is restarted and rejoins. Each client sends greedy requests from a fixed prompt set and checks every
completion against single-process `LLM` output. Reports requests completed (exact / not exact), migrated and
failed by status, blocks leaked once the load stops (must be 0), and per kill the time until serving again (the
victim back in rotation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import threading
import time
from collections import Counter

PROMPTS = ["Return a list of", "The default value is", "If the file does not exist,", "Raise a ValueError",
           "This module provides", "Return True if the", "Parse the arguments", "Open the file and"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--kill-every-s", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--decode-tp", type=int, default=2)
    ap.add_argument("--max-restarts", type=int, default=100, help="per worker (the run must not exhaust them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/chaos.json")
    args = ap.parse_args()
    print(json.dumps(run(args), indent=2))


def run(args: argparse.Namespace) -> dict:
    import ray
    import ray.cloudpickle

    from client import Client, KvrelayError
    from deploy import DEFAULT_MODEL_DIR
    from deploy.config import ServeConfig
    from deploy.inprocess import serve_in_process
    from engine import LLM, SamplingParams

    params = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm = LLM(DEFAULT_MODEL_DIR, dtype="float32", max_model_len=512)
    refs = {p: llm.generate([p], SamplingParams(**params))[0].token_ids for p in PROMPTS}
    del llm
    served = serve_in_process(ServeConfig(
        model=DEFAULT_MODEL_DIR, dtype="float32", decode_tp=args.decode_tp, host="127.0.0.1", port=0, device="cpu",
        prefill_num_blocks=96, decode_num_blocks=96, max_model_len=512, transfer_timeout_s=20.0,
        max_num_seqs=max(8, args.clients), max_queued_requests=4 * args.clients, max_restarts=args.max_restarts,
        queue_timeout_s=60.0), supervise=True)
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    rng = random.Random(args.seed)
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]

    def client_loop(i: int) -> None:
        with Client(served.target, timeout=120) as c:
            while not stop.is_set():
                with lock:
                    if sent[0] >= args.max_requests:
                        return
                    sent[0] += 1
                prompt = PROMPTS[(i + sent[0]) % len(PROMPTS)]
                try:
                    out = c.generate(prompt, **params)
                    key = "OK" if out.token_ids == refs[prompt] else "OK_NOT_EXACT"
                except KvrelayError as e:
                    key = e.code
                with lock:
                    statuses[key] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    kills = []
    end = t0 + args.minutes * 60
    try:
        while time.monotonic() + args.kill_every_s < end:
            time.sleep(args.kill_every_s)
            name, actors = rng.choice(sorted(served.deployment.units().items()))
            rank = rng.randrange(len(actors))
            try:
                pid = ray.get(actors[rank].__ray_call__.remote(lambda a: os.getpid()), timeout=30)
            except Exception as e:  # still restarting from the last kill: skip this one
                kills.append(dict(worker=name, rank=rank, skipped=str(e)[:80]))
                continue
            before = len(served.supervisor.rejoined_at.get(name, []))
            os.kill(pid, 9)
            killed = time.monotonic()
            kills.append(dict(worker=name, rank=rank, at_s=round(killed - t0, 1), before=before))
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    for k in kills:  # time until serving again: from the kill until the victim rejoined the router's rotation
        if "before" in k:
            times = served.supervisor.rejoined_at.get(k["worker"], [])
            i = k.pop("before")
            k["serving_again_s"] = round(times[i] - t0 - k["at_s"], 1) if len(times) > i else None
    try:
        loads = served.wait_all_free(60)
        leaked = 0
    except AssertionError:
        loads = served.loads()
        leaked = sum(x.num_blocks - x.free_blocks for x in loads)
    m = served.router.metrics
    migrated = m.registry.get_sample_value("kvrelay:request_migrations_total", {"model_name": m.model_name}) or 0
    retried = m.registry.get_sample_value("kvrelay:request_retries_total", {"model_name": m.model_name}) or 0
    served.stop()
    result = dict(minutes=args.minutes, kill_every_s=args.kill_every_s, clients=args.clients,
                  requests=sum(statuses.values()), statuses=dict(statuses), migrated=int(migrated),
                  prefill_retried=int(retried), blocks_leaked=leaked, kills=kills,
                  elapsed_s=round(time.monotonic() - t0, 1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    main()
