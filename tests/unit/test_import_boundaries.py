"""The client SDK, the router (both fronts) and the load tester import no torch: they run where no GPU stack is
installed."""

from __future__ import annotations

import subprocess
import sys


def test_client_router_and_bench_do_not_import_torch():
    code = ("import sys, client, client.cli, router.server, router.orchestrator, router.http.app, router.http.server, "
            "bench.load.cli, bench.load.openai_backend; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
