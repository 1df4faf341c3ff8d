"""Load on ``labeltriage serve``: concurrent /predict calls with stalled connections held open.

The backend (:mod:`autolabel.mlserver`, FastAPI on uvicorn) runs in its own process on
127.0.0.1 with a synthetic calibrated run of ``--items`` tasks (a third of them easy) and
in-memory predictions, so the figures are the server's, not a file system's.  The client,
in this process:

1. opens ``--stalled`` connections that send half a request and then nothing;
2. sends ``--rounds`` rounds of ``--concurrency`` simultaneous /predict requests (each with
   ``--tasks`` tasks, as Label Studio batches them) over fresh connections, and times each;
3. samples the server process's thread count and resident memory every 20 ms meanwhile;
4. checks that every stalled connection was closed by the server after its read timeout
   (``--read-timeout``) while the load ran.

The same load then runs with four times as many stalled connections: bounded threads and
memory mean the server's figures barely move.  Results go to
``bench/results/serve_load.md`` (with the machine and its load).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py            # the recorded run
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="stop"/></RectangleLabels></View>'
)


# -- the server process -------------------------------------------------------------------


def serve(run_dir: str, port_file: str, items: int, read_timeout: float) -> None:
    """Run the backend on a free loopback port (written to ``port_file``) until SIGTERM."""
    from autolabel.mlbackend import BackendConfig
    from autolabel.mlserver import make_server
    from connectors.formats.base import PredictionSource
    from connectors.labelmap import LabelMap
    from connectors.model import Annotation, Item, Prediction

    class MemoryPredictions(PredictionSource):
        def __init__(self) -> None:
            box = Annotation(label="stop sign", box=(40.0, 30.0, 200.0, 150.0), score=0.9)
            self.preds = {
                str(i): Prediction(item_id=str(i), annotations=[box], model_version="bench")
                for i in range(items)
            }

        def get(self, item_id: str, item: Item | None = None) -> Prediction | None:
            return self.preds.get(item_id)

        def __iter__(self) -> Iterator[Prediction]:
            yield from self.preds.values()

    config = BackendConfig(
        run_url=run_dir,
        predictions=MemoryPredictions(),
        label_map=LabelMap(map={"stop sign": "stop"}),
        size_of=lambda task: (640, 480),
        read_timeout_s=read_timeout,
        limit_concurrency=1024,
    )
    server = make_server(config, port=0)
    Path(port_file).write_text(str(server.address[1]))
    server.serve()


def write_run(folder: Path, items: int) -> None:
    import pandas as pd

    from difficulty.table import write_difficulty

    scores = [(i % 3) / 3 + 0.1 for i in range(items)]
    df = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(items)],
            "uri": [f"http://ls/data/upload/1/{i}.jpg" for i in range(items)],
            "status": ["unlabeled"] * items,
            "fourier": scores,
            "score": scores,
            "tier": ["easy" if s < 0.3 else "hard" for s in scores],
            "rank": list(range(items, 0, -1)),
            "error": [None] * items,
        }
    )
    write_difficulty(df, str(folder), {"run_id": "bench", "scorers": ["fourier"]})
    body = {"run_id": "bench", "stage": "autolabel", "task": "detection", "threshold": 0.3,
            "box_confidence": 0.5, "model_version": "bench"}  # fmt: skip
    (folder / "autolabel.json").write_text(json.dumps(body))


# -- measuring it ---------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Peak thread count and resident memory of process ``pid``, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.threads = 0
        self.rss_kib = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    self.threads = max(self.threads, int(line.split()[1]))
                elif line.startswith("VmRSS:"):
                    self.rss_kib = max(self.rss_kib, int(line.split()[1]))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.02)


def stall(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that send half a request and then nothing."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
        conns.append(s)
    return conns


def closed_by_server(conns: list[socket.socket]) -> int:
    closed = 0
    for s in conns:
        s.setblocking(False)
        try:
            closed += s.recv(1024) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return closed


async def load(port: int, concurrency: int, rounds: int, tasks: int, items: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    served = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(k: int) -> None:
            nonlocal errors, served
            ids = [(k * tasks + j) % items for j in range(tasks)]
            body = {"tasks": [{"id": i, "data": {"image": f"/data/upload/1/{i}.jpg"}} for i in ids],
                    "label_config": LABEL_CONFIG}  # fmt: skip
            start = time.perf_counter()
            try:
                r = await client.post(f"http://127.0.0.1:{port}/predict", json=body)
                ok = r.status_code == 200
                served += sum(1 for res in r.json()["results"] if res) if ok else 0
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

        for r in range(rounds):
            await asyncio.gather(*(one(r * concurrency + k) for k in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "served_tasks": served,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": 1000 * latencies[-1],
    }


def scenario(args: argparse.Namespace, run_dir: Path, stalled: int) -> dict[str, Any]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(run_dir), str(port_file), str(args.items),
         str(args.read_timeout)],
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the backend did not start")
            time.sleep(0.1)
        port = int(port_file.read_text())
        asyncio.run(load(port, 10, 1, args.tasks, args.items))  # warm-up
        sampler = Sampler(proc.pid)
        sampler.sample()
        idle = (sampler.threads, sampler.rss_kib)
        sampler.threads = sampler.rss_kib = 0
        sampler.start()
        started = time.monotonic()
        conns = stall(port, stalled)
        result = asyncio.run(load(port, args.concurrency, args.rounds, args.tasks, args.items))
        time.sleep(max(0.0, args.read_timeout + 1.0 - (time.monotonic() - started)))
        result["stalled"] = stalled
        result["stalled_closed"] = closed_by_server(conns)
        sampler.stop.set()
        sampler.join()
        result.update(
            idle_threads=idle[0], idle_rss_mib=idle[1] / 1024,
            max_threads=sampler.threads, peak_rss_mib=sampler.rss_kib / 1024,
        )  # fmt: skip
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=4, metavar=("RUN", "PORT_FILE", "ITEMS", "TIMEOUT"))
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10, help="tasks per /predict request")
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--stalled", type=int, default=50)
    parser.add_argument("--read-timeout", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="1 round, 20 stalled connections")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.md"))
    args = parser.parse_args()
    if args.serve:
        run, port_file, items, timeout = args.serve
        serve(run, port_file, int(items), float(timeout))
        return
    if args.quick:
        args.rounds, args.stalled = 1, 20
    from bench._common import machine_line

    run_dir = Path(tempfile.mkdtemp(prefix="serve-load-"))
    write_run(run_dir, args.items)
    machine = machine_line()
    rows = [scenario(args, run_dir, s) for s in (args.stalled, 4 * args.stalled)]
    lines = [
        "# `labeltriage serve` under load",
        "",
        f"Machine: {machine}",
        "",
        f"`python bench/serve_load.py{' --quick' if args.quick else ''}`: the backend (FastAPI on "
        f"uvicorn, 8 worker threads, read timeout {args.read_timeout:g} s) in its own process on "
        f"127.0.0.1; {args.rounds} rounds of {args.concurrency} simultaneous /predict requests "
        f"({args.tasks} tasks each, a third of them easy, {args.items} items in the run), each over "
        "a fresh connection, while stalled connections (half a request, then nothing) are held "
        "open. Threads and resident memory of the server process: peak, sampled every 20 ms.",
        "",
        "| stalled connections | requests | errors | p50 ms | p99 ms | max ms | threads idle → peak "
        "| RSS MiB idle → peak | stalled closed by the server |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stalled']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['idle_threads']} → {r['max_threads']} | "
            f"{r['idle_rss_mib']:.0f} → {r['peak_rss_mib']:.0f} | "
            f"{r['stalled_closed']}/{r['stalled']} |"
        )
    lines += [
        "",
        "Latencies are client-side, from sending a request to its whole answer, and include "
        "queueing behind the other requests of the round on this machine's cores (the client "
        "shares them). The thread count does not follow the number of connections: uvicorn "
        "serves connections on one event loop, and request work runs on a fixed pool of worker "
        "threads. Each stalled connection is closed once its read timeout passes.",
        "",
        "Raw figures: " + json.dumps(rows),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
