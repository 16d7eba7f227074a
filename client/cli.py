"""`kvrelay generate "prompt"`: stream a completion to stdout (usage and timings to stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from client.errors import KvrelayError
from client.sync_client import Client


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="prompt text (read from stdin when omitted or '-')")
    p.add_argument("--target", default="localhost:50051", help="router address host:port (default %(default)s)")
    p.add_argument("--token-ids", action="store_true", help="the prompt is whitespace-separated token ids")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the whole completion as JSON at the end instead")
    p.add_argument("--api-key", default=os.environ.get("KVRELAY_API_KEY"),
                   help="the server's API key (default $KVRELAY_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (system roots)")
    p.add_argument("--ca-cert", help="PEM certificate to trust for TLS (implies --tls)")


def run(args: argparse.Namespace) -> int:
    prompt_text = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    prompt: str | list[int] = prompt_text
    if args.token_ids:
        try:
            prompt = [int(t) for t in prompt_text.split()]
        except ValueError:
            print("error: --token-ids needs whitespace-separated integers", file=sys.stderr)
            return 2
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos or None)
    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key, tls=args.tls,
                    ca_cert=args.ca_cert) as client, client.stream(prompt, **sampling) as stream:
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            final = stream.final
    except KvrelayError as e:
        print(f"\nerror: {e.code}: {e.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    assert final is not None
    if args.json:
        print(json.dumps({"request_id": final.request_id, "text": "".join(c.text for c in chunks),
                          "token_ids": [t for c in chunks for t in c.token_ids],
                          "finish_reason": final.finish_reason, "usage": vars(final.usage),
                          "timings": vars(final.timings)}))
    else:
        print(flush=True)  # end the streamed text's line on stdout
        u, t = final.usage, final.timings
        print(f"[{final.finish_reason}] prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), "
              f"completion {u.completion_tokens} tokens; first token {t.first_token_ms:.0f} ms, "
              f"total {t.total_ms:.0f} ms", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrelay generate", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
