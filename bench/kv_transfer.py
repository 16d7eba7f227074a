"""KV transfer speed between a prefill engine (GPU 0) and a decode engine (GPU 1), against raw NCCL.

    python -m bench.kv_transfer --tokens 1024 4096 16384 --out bench/results/kv_transfer.json   # 2 GPUs
    python -m bench.kv_transfer --device cpu --shape tiny --tokens 64 256                         # dry run, gloo
    python -m bench.kv_transfer --workload shared-prefix --device cpu --shape tiny   # multi-turn, sharing on/off

Llama-3.1-8B shape, random bfloat16 weights (load_format="dummy"). For each prompt length N, in one run:
  raw       one contiguous buffer of the request's KV bytes, send/recv over a private 2-rank NCCL group
  transfer  the connector sending an already-computed request's blocks layer by layer (no compute)
  prefill   one prefill step of N tokens with no transfer
  overlap   the same step sending each layer as soon as it is written (step ends when every send completed)
Reported: transfer bandwidth / raw bandwidth, and (prefill + transfer) / prefill alone. `--workload shared-prefix`
instead measures bytes and time of a multi-turn workload with and without decode-side prefix sharing
(bench/kv_transfer_prefix.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import wait

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
CONNECTOR = "kv_transfer.connector:KVConnector"


def write_config(path: str, shape: str, dtype: str) -> None:
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], max_position_embeddings=32768,
               rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2,
               torch_dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def _engine(args, model_dir: str, device: str):
    from engine import EngineConfig, LLMEngine, RuntimeConfig

    n = max(args.tokens)
    # Synchronous steps: each timed step() returns its own outputs.
    return LLMEngine(EngineConfig.from_model_dir(
        model_dir, dtype=args.dtype, device=device, load_format="dummy", worker_extension=CONNECTOR,
        num_blocks=(n // 16 + 8) * 2, max_model_len=n + 64, max_num_batched_tokens=n + 64,
        enable_prefix_caching=False, runtime=RuntimeConfig(async_scheduling=False)))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def decode_proc(args, model_dir: str, conn) -> None:
    import torch

    from engine import SamplingParams
    from kv_transfer.channel import KVChannel

    device = "cuda:1" if args.device == "cuda" else "cpu"
    eng = _engine(args, model_dir, device)
    raw_store = KVChannel.listen("127.0.0.1", 120)
    conn.send((eng.call_extension("listen", "p0", 1), raw_store.port))
    raw = KVChannel(raw_store, KVChannel.RECEIVER, torch.device(device), 600)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    while (msg := conn.recv()) is not None:
        kind, rid, n = msg
        if kind == "raw":  # n bytes, `reps` times; time from the first recv posted to the last completed
            buf = torch.empty(n // 2, dtype=torch.bfloat16, device=device)
            raw.recv(buf).wait()  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                raw.recv(buf).wait()
            _sync(device)
            conn.send((time.perf_counter() - t0) / args.reps)
            continue
        eng.reserve_remote_prefill(rid, [7] * n, params, "p0", 1, timeout_s=600)
        eng.set_first_token(rid, 3)
        conn.send("reserved")
        while not any(o.request_id == rid for o in eng.step()):  # admitted once every layer has landed
            time.sleep(0.0002)  # an idle loop must not starve the receiver thread of the GIL
        conn.send(time.time())
        eng.abort_request(rid)
        eng.step()
    eng.shutdown()


def prefill_proc(args, model_dir: str, conn) -> None:
    import torch

    from engine import SamplingParams
    from engine.scheduler_output import SchedulerOutput, TransferChunk
    from kv_transfer.channel import KVChannel

    device = "cuda:0" if args.device == "cuda" else "cpu"
    eng = _engine(args, model_dir, device)
    addrs, raw_port = conn.recv()
    eng.call_extension("connect", "d0", 1, addrs)
    raw = KVChannel(KVChannel.connect("127.0.0.1", raw_port, 120), KVChannel.SENDER, torch.device(device), 600)
    ext = eng.executor.extension
    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rows, seq = [], 0

    def step_time(n: int, transfer: bool) -> float:
        nonlocal seq
        seq += 1
        rid = f"r{seq}"
        if transfer:
            conn.send(("reserve", rid, n))
            assert conn.recv() == "reserved"
        vocab = eng.config.model.vocab_size
        eng.add_request(rid, [(seq * 7919 + i) % (vocab - 3) + 3 for i in range(n)], p,
                        transfer={"peer": "d0"} if transfer else None)
        _sync(device)
        t0 = time.perf_counter()
        (out,) = eng.step()
        _sync(device)
        dt = time.perf_counter() - t0
        assert out.finished and out.error is None, out.error
        if transfer:
            conn.recv()  # landed
        return dt

    for n in args.tokens:
        kv_bytes = n * eng.executor.runner.kv_block_bytes // eng.config.cache.block_size
        conn.send(("raw", None, kv_bytes))
        buf = torch.ones(kv_bytes // 2, dtype=torch.bfloat16, device=device)
        raw.send(buf).wait()
        for _ in range(args.reps):
            raw.send(buf).wait()
        _sync(device)
        raw_s = conn.recv()
        # Transfer alone: send the blocks of a fake, already-computed request (same bytes, no compute).
        nb = -(-n // eng.config.cache.block_size)
        xfer = []
        for _ in range(args.reps):
            seq += 1
            rid = f"x{seq}"
            conn.send(("reserve", rid, n))
            assert conn.recv() == "reserved"
            fake = SchedulerOutput(request_ids=[rid], slots=[0], starts=[0], num_tokens=[n], output_index=[0],
                                   token_ids=[0] * n, transfers={0: TransferChunk("d0", list(range(nb)), 0, True)})
            _sync(device)
            t0 = time.perf_counter()
            ext.begin_step(fake)
            for layer in range(eng.config.model.num_layers):
                ext.on_layer(layer)
            ev = ext.end_step(fake)
            _sync(device)
            xfer.append(time.perf_counter() - t0)
            assert not ev.send_failed, ev
            conn.recv()
        prefill = [step_time(n, False) for _ in range(args.reps + 1)][1:]
        overlap = [step_time(n, True) for _ in range(args.reps + 1)][1:]
        t_raw, t_x, t_p, t_o = raw_s, min(xfer), min(prefill), min(overlap)
        rows.append(dict(tokens=n, kv_bytes=kv_bytes, raw_ms=t_raw * 1e3, raw_GBps=kv_bytes / t_raw / 1e9,
                         transfer_ms=t_x * 1e3, transfer_GBps=kv_bytes / t_x / 1e9, transfer_vs_raw=t_raw / t_x,
                         prefill_ms=t_p * 1e3, prefill_transfer_ms=t_o * 1e3, overlap_ratio=t_o / t_p))
    conn.send(None)
    conn.send(rows)
    eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/kv_transfer.json")
    ap.add_argument("--workload", choices=["raw", "shared-prefix"], default="raw")
    ap.add_argument("--conversations", type=int, default=4, help="shared-prefix: conversations")
    ap.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    ap.add_argument("--system-len", type=int, default=512, help="shared-prefix: shared system prompt tokens")
    ap.add_argument("--turn-len", type=int, default=48, help="shared-prefix: user tokens per turn")
    ap.add_argument("--gen", type=int, default=32, help="shared-prefix: tokens generated per turn")
    ap.add_argument("--num-blocks", type=int, default=512, help="shared-prefix: KV blocks per engine")
    ap.add_argument("--max-model-len", type=int, default=4096, help="shared-prefix: longest conversation")
    args = ap.parse_args()
    if args.workload == "shared-prefix":
        from bench.kv_transfer_prefix import report

        with tempfile.TemporaryDirectory() as d:
            write_config(d, args.shape, args.dtype)
            rows = report(d, args)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(workload="shared-prefix", shape=args.shape, dtype=args.dtype, device=args.device,
                           rows=rows, date=time.strftime("%Y-%m-%d")), f, indent=2)
        return
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        write_config(d, args.shape, args.dtype)
        dec_parent, dec_child = ctx.Pipe()
        pre_parent, pre_child = ctx.Pipe()
        procs = [ctx.Process(target=decode_proc, args=(args, d, dec_child)),
                 ctx.Process(target=prefill_proc, args=(args, d, pre_child))]
        for p in procs:
            p.start()
        rows = None
        while rows is None:  # forward every message between the two sides until the prefill side is done
            for c in wait([pre_parent, dec_parent] + [p.sentinel for p in procs]):
                if not hasattr(c, "recv"):
                    raise SystemExit(f"a benchmark process died: exit codes {[p.exitcode for p in procs]}")
                msg = c.recv()
                if c is dec_parent:
                    pre_parent.send(msg)
                elif msg is None:
                    dec_parent.send(None)
                    rows = pre_parent.recv()
                else:
                    dec_parent.send(msg)
        for p in procs:
            p.join(timeout=60)
    device = "cpu (gloo)"
    if args.device == "cuda":
        import torch

        device = f"2x {torch.cuda.get_device_name(0)} (NCCL)"
    result = dict(shape=args.shape, dtype=args.dtype, device=device, rows=rows, date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{args.shape} {args.dtype} KV transfer on {device}")
    print(f"{'tokens':>6} {'MiB':>7} {'raw GB/s':>8} {'xfer GB/s':>9} {'of raw':>6} {'prefill ms':>10} "
          f"{'+xfer ms':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['kv_bytes'] / 2**20:>7.0f} {r['raw_GBps']:>8.1f} {r['transfer_GBps']:>9.1f} "
              f"{r['transfer_vs_raw']:>6.1%} {r['prefill_ms']:>10.1f} {r['prefill_transfer_ms']:>8.1f} "
              f"{r['overlap_ratio']:>6.2f}")


if __name__ == "__main__":
    main()
