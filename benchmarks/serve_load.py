"""Load test of `digitjax serve`: closed loops at several concurrencies and an open loop at a
fixed rate, beside the images/s `digitjax predict` reaches offline on the same images.

Every request carries one canvas-style PNG (white strokes on a 280x280 black canvas, drawn from
MNIST test digits). The script starts each server itself, with batching and with
`--max-batch 1`, alternating them `--repeats` times, and prints a markdown table and JSON.

    python benchmarks/serve_load.py --requests 2000 --c32-requests 20000 --repeats 2
"""

import argparse
import asyncio
import contextlib
import gc
import io
import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from digitjax.data import EMBEDDED_MNIST, read_idx_split
from digitjax.synthetic.user_digits import canvas

CONCURRENCIES = (1, 8, 32, 128)
OPEN_LOOP_CLIENTS = 16
TICKS = os.sysconf("SC_CLK_TCK")


def canvas_pngs(count: int, seed: int = 0) -> tuple[list[bytes], list[int]]:
    images, labels = read_idx_split(EMBEDDED_MNIST, "test")
    rng = np.random.default_rng(seed)
    pngs = []
    for digit in images[:count]:
        buffer = io.BytesIO()
        canvas(digit, rng).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs, [int(label) for label in labels[:count]]


def offline_predict_rate(pngs: list[bytes], copies: int) -> tuple[float, float]:
    """Images/s of `digitjax predict` on these images as files, and its CPU ms per image: the
    difference between a run on `copies` times the images and a run on them once cancels
    start-up and compilation."""
    with tempfile.TemporaryDirectory() as folder:
        for copy in range(copies):
            (Path(folder) / f"c{copy}").mkdir()
            for n, png in enumerate(pngs):
                (Path(folder) / f"c{copy}" / f"{n}.png").write_bytes(png)
        seconds, cpu = [], []
        for paths in ([f"{folder}/c0"], [folder]):
            started, cpu_before = time.perf_counter(), children_cpu()
            command = ["digitjax", "predict", *paths, "--json"]
            subprocess.run(command, check=True, capture_output=True, cwd=folder)
            seconds.append(time.perf_counter() - started)
            cpu.append(children_cpu() - cpu_before)
    images = (copies - 1) * len(pngs)
    return images / (seconds[1] - seconds[0]), 1000 * (cpu[1] - cpu[0]) / images


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ServerProcess:
    def __init__(self, *flags: str):
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            ["digitjax", "serve", "--port", "0", *flags],
            stderr=self.log,
            stdout=self.log,
            start_new_session=True,
        )
        self.url = None
        while self.url is None or "Ready" not in self.output():
            if self.process.poll() is not None:
                raise RuntimeError(self.output())
            found = re.search(r"http://[\d.]+:\d+", self.output())
            self.url = found.group(0) if found else None
            time.sleep(0.1)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def cpu_seconds(self) -> float:
        """User+system CPU of the server and its preprocessing workers."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        pids += [int(pid) for pid in children.read_text().split()]
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / TICKS

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def metric(url: str, line_start: str) -> float:
    """The sum of the server's /metrics values on the lines that start with `line_start`."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(line_start))


def batch_histogram(metrics: str) -> dict[int, float]:
    """Cumulative counts of the batch-size histogram, by upper bound."""
    found = re.findall(r'digitjax_batch_size_bucket\{le="([\d.]+)"\} ([\d.e+]+)', metrics)
    return {int(float(le)): float(count) for le, count in found}


def histogram_delta(before: dict, after: dict) -> dict[str, int]:
    """Batches per size range, between two scrapes."""
    delta, previous, low = {}, 0.0, 1
    for bound in sorted(after):
        cumulative = after[bound] - before.get(bound, 0)
        if cumulative - previous:
            delta[f"{low}-{bound}" if low < bound else str(bound)] = int(cumulative - previous)
        previous, low = cumulative, bound + 1
    return delta


async def one_request(client: httpx.AsyncClient, url: str, png: bytes, label: int) -> tuple:
    """(ok, correct) of one prediction."""
    try:
        response = await client.post(url, content=png, headers={"Content-Type": "image/png"})
    except httpx.HTTPError:
        return False, False
    if response.status_code != 200:
        return False, False
    return True, response.json()["predictions"][0]["digit"] == label


async def run_phase(
    base: str, pngs: list, labels: list, concurrency: int | None, requests: int, rate: float | None
) -> dict:
    """A closed loop of `concurrency` clients, or (with `rate`) an open loop whose latencies
    count from each request's scheduled time, so that queueing is not hidden."""
    url, latencies, outcomes = f"{base}/api/predict", [], []
    # One small client per closed-loop worker (or per slice of the open loop): httpx's pool
    # scans its connections for every request, so one client with 128 of them costs ~3x the
    # CPU per request, which the server would then lack.
    count, per_client = (concurrency, 1) if rate is None else (OPEN_LOOP_CLIENTS, 64)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(limits=httpx.Limits(max_connections=per_client), timeout=30)
            )
            for _ in range(count)
        ]
        metrics_before = batch_histogram((await clients[0].get(f"{base}/metrics")).text)
        # A full collection of the generator's own heap would stall every request in flight.
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        cpu_before, started = time.process_time(), loop.time()

        async def timed(client: httpx.AsyncClient, n: int, scheduled: float) -> None:
            outcome = await one_request(client, url, pngs[n % len(pngs)], labels[n % len(pngs)])
            latencies.append(loop.time() - scheduled)
            outcomes.append(outcome)

        if rate is None:
            counter = itertools.count()

            async def client_loop(client: httpx.AsyncClient) -> None:
                while (n := next(counter)) < requests:
                    await timed(client, n, loop.time())

            await asyncio.gather(*(client_loop(client) for client in clients))
        else:
            tasks = []
            for n in range(requests):
                scheduled = started + n / rate
                await asyncio.sleep(max(0.0, scheduled - loop.time()))
                client = clients[n % count]
                tasks.append(asyncio.create_task(timed(client, n, scheduled)))
            await asyncio.gather(*tasks)
        wall, cpu = loop.time() - started, time.process_time() - cpu_before
        metrics_after = batch_histogram((await clients[0].get(f"{base}/metrics")).text)
    milliseconds = np.array(latencies) * 1000
    ok = sum(o for o, _ in outcomes)
    return {
        "mode": f"open {rate:.0f}/s" if rate else f"closed c={concurrency}",
        "requests": requests,
        "req_per_s": requests / wall,
        **{f"p{q}_ms": float(np.percentile(milliseconds, q)) for q in (50, 90, 99)},
        "max_ms": float(milliseconds.max()),
        "errors": requests - ok,
        "accuracy": sum(c for _, c in outcomes) / max(ok, 1),
        "generator_cpu": cpu / wall,
        "batches": histogram_delta(metrics_before, metrics_after),
        "wall_s": wall,
    }


def measure_server(flags: list[str], pngs: list, labels: list, args) -> list[dict]:
    server = ServerProcess(*flags)
    rows = []
    try:
        for concurrency in args.concurrencies:
            requests = args.c32_requests if concurrency == 32 else args.requests
            cpu_before = server.cpu_seconds()
            row = asyncio.run(run_phase(server.url, pngs, labels, concurrency, requests, None))
            row["server_cpu"] = (server.cpu_seconds() - cpu_before) / row["wall_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        if args.open_s:
            rate = max(r["req_per_s"] for r in rows) / 2
            cpu_before = server.cpu_seconds()
            requests = int(rate * args.open_s)
            row = asyncio.run(run_phase(server.url, pngs, labels, None, requests, rate))
            row["server_cpu"] = (server.cpu_seconds() - cpu_before) / row["wall_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"server exited with {code}: {server.output()}")
    return rows


def table(results: list[dict]) -> str:
    lines = [
        "| server | load (requests) | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | "
        "batches (size: count) | server CPU ms/req | generator CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for r in result["rows"]:
            batches = " ".join(f"{k}: {v}" for k, v in r["batches"].items())
            per_request = 1000 * r["wall_s"] / r["requests"]
            lines.append(
                f"| {result['server']} | {r['mode']} ({r['requests']:,}) | {r['req_per_s']:,.0f}"
                f" | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.0f}"
                f" | {r['errors']} | {batches} | {r['server_cpu'] * per_request:.2f} | "
                f"{r['generator_cpu'] * per_request:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200, help="Distinct canvas PNGs.")
    parser.add_argument("--requests", type=int, default=2000, help="Per closed-loop phase.")
    parser.add_argument("--c32-requests", type=int, default=20000)
    parser.add_argument("--open-s", type=float, default=10, help="Open-loop duration (0: none).")
    parser.add_argument(
        "--concurrencies",
        type=lambda text: [int(c) for c in text.split(",")],
        default=CONCURRENCIES,
        help="Closed-loop clients, comma-separated.",
    )
    parser.add_argument(
        "--servers", default="batching,--max-batch 1", help="Which servers, comma-separated."
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--offline-copies", type=int, default=10, help="0: no offline run.")
    parser.add_argument("--out", type=Path, help="Write the JSON results here.")
    args = parser.parse_args()
    pngs, labels = canvas_pngs(args.images)
    results, offline = [], []
    servers = {"batching": [], "--max-batch 1": ["--max-batch", "1"]}
    for repeat in range(args.repeats):
        if args.offline_copies:
            offline.append(offline_predict_rate(pngs, args.offline_copies))
            print(f"offline predict: {offline[-1][0]:.0f} img/s", file=sys.stderr)
        for name in args.servers.split(","):
            rows = measure_server(servers[name], pngs, labels, args)
            results.append({"server": name, "repeat": repeat, "rows": rows})
    if args.offline_copies:
        offline.append(offline_predict_rate(pngs, args.offline_copies))
    print(table(results))
    for rate, cpu in offline:
        print(f"offline `digitjax predict`: {rate:,.0f} images/s, {cpu:.2f} CPU ms per image")
    if args.out:
        document = {"servers": results, "offline_predict": offline}
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
