"""What a normal client of `digitjax serve` sees while the server is attacked.

The normal client sends one ~1 kB PNG per request in a closed loop on one kept-alive
connection from 127.0.0.1, while an attacker process (from 127.0.0.2, another loopback address,
so that budgets per client address apply to it alone) runs one of these attacks:

- slowloris: thousands of connections that send `POST /api/predict HTTP/1.1\\r\\nHost: x\\r\\n`
  and wait;
- images: requests of many all-zero PNGs of 1 x 49,999,000 pixels (97 kB each, slow to
  decode), several at once;
- images_mid: requests of 25 all-zero PNGs of 1990x1990 pixels (just under the "large"
  mark of 4 megapixels), from three addresses, one request at a time each (within budgets);
- multipart: 7.9 MiB bodies of 150,000 tiny parts, several at once;
- idle: 1,200 connections idle on a kept-alive connection after one request, each opened
  again once the server closes it; idle_many: the same from 1,200 addresses (browsers left
  open, say);
- bodiless: the same with a request's head and never its body;
- heads: four connections sending header lines of 1 MiB without end, opened again when
  closed;
- pipeline: four connections sending pipelined requests without reading the answers, opened
  again when closed.

Everything is bounded in time and runs on loopback only. The server runs the code on
PYTHONPATH, so `PYTHONPATH=/path/to/main python benchmarks/serve_attacks.py` measures another
checkout's server with the same attacks.

    python benchmarks/serve_attacks.py --seconds 10
"""

import argparse
import asyncio
import collections
import contextlib
import io
import json
import multiprocessing
import queue
import resource
import struct
import sys
import time
import zlib
from typing import Any

import httpx
import numpy as np
from PIL import Image
from serve_load import ServerProcess

from digitjax.data import EMBEDDED_MNIST, read_idx_split

NORMAL, ATTACKER = "127.0.0.1", "127.0.0.2"
MiB = 1 << 20
SLOWLORIS_HEAD = b"POST /api/predict HTTP/1.1\r\nHost: x\r\n"


def normal_png() -> tuple[bytes, int]:
    """A ~1 kB PNG of an MNIST test digit (84x84), and its label."""
    images, labels = read_idx_split(EMBEDDED_MNIST, "test")
    buffer = io.BytesIO()
    Image.fromarray(images[0]).resize((84, 84)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue(), int(labels[0])


def slow_png(width: int = 1, height: int = 49_999_000) -> bytes:
    """An all-zero grayscale PNG: small to send, slow to decode (one filter byte per row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor = zlib.compressobj(9)
    rows = b"\0" * (width + 1) * 100_000
    pixels = b"".join(compressor.compress(rows) for _ in range(height // 100_000))
    pixels += compressor.compress(b"\0" * (width + 1) * (height % 100_000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def many_parts_body(parts: int = 150_000) -> tuple[bytes, str]:
    """A multipart body of `parts` one-byte file parts (~7.9 MiB), and its Content-Type."""
    part = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n'
    return part * parts + b"--b--\r\n", "multipart/form-data; boundary=b"


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.array(latencies or [float("nan")]) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def normal_client(url: str, seconds: float, keep_alive: bool = True) -> dict[str, Any]:
    """A closed loop of predictions of one digit for `seconds`, on one kept-alive connection
    or a new connection each time: latencies and errors."""
    png, label = normal_png()
    latencies, errors = [], collections.Counter()
    limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)
    transport = httpx.AsyncHTTPTransport(local_address=NORMAL, limits=limits)
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            started = loop.time()
            try:
                response = await client.post(
                    f"{url}/api/predict", content=png, headers={"Content-Type": "image/png"}
                )
                ok = response.status_code == 200
                ok = ok and response.json()["predictions"][0]["digit"] == label
                error = None if ok else str(response.status_code)
            except httpx.HTTPError as e:
                error = type(e).__name__
            latencies.append(loop.time() - started)
            if error:
                errors[error] += 1
    return {"requests": len(latencies), **percentiles(latencies), "errors": dict(errors)}


async def open_connection(
    url: str, source: str = ATTACKER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


def loopback(n: int) -> str:
    """The n-th of many loopback addresses (127.0.1.0 onwards): as many clients."""
    return f"127.0.{1 + n // 256}.{n % 256}"


async def slowloris(url: str, seconds: float, connections: int = 2500) -> dict[str, Any]:
    """`connections` connections that send a request line and one header, then wait for the
    server to answer or close (at most `seconds`): how each ended, and after how long."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def one() -> tuple[str, float]:
        started = loop.time()
        try:
            reader, writer = await open_connection(url)
            writer.write(SLOWLORIS_HEAD)
            await writer.drain()
            async with asyncio.timeout(end - loop.time()):
                reply = await reader.read(200)
            writer.close()
        except TimeoutError:
            return "still open", loop.time() - started
        except OSError as e:
            return type(e).__name__, loop.time() - started
        status = reply[9:12].decode() if reply.startswith(b"HTTP/1.1 ") else "closed"
        return status, loop.time() - started

    ended = await asyncio.gather(*(one() for _ in range(connections)))
    outcome = collections.Counter(how for how, _ in ended)
    closed_after = [s for how, s in ended if how != "still open"]
    return {
        "connections": connections,
        "outcome": dict(outcome),
        "max_s_to_close": max(closed_after, default=None),
    }


IDLE = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"  # answered, then the connection stays
BODILESS = SLOWLORIS_HEAD + b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n"


async def held(
    url: str, seconds: float, request: bytes, many: bool = False, connections: int = 1200
) -> dict:
    """`connections` connections that hold the server with a complete head: each sends
    `request` and waits, and is opened again as soon as the server closes it, for `seconds`;
    from one address, or (`many`) each from an address of its own, as many clients would.
    How the server ended them: the status of its last answer on each."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    outcome: collections.Counter[str] = collections.Counter()

    async def one(source: str) -> None:
        while loop.time() < end:
            last = b""
            try:
                reader, writer = await open_connection(url, source)
                writer.write(request)
                async with asyncio.timeout(end - loop.time()):
                    while data := await reader.read(4096):
                        last = data if data.startswith(b"HTTP/1.1 ") else last
                writer.close()
            except TimeoutError:
                return
            except OSError as e:
                outcome[type(e).__name__] += 1
                continue
            outcome[last[9:12].decode() if last else "closed"] += 1

    sources = [loopback(n) if many else ATTACKER for n in range(connections)]
    await asyncio.gather(*(one(source) for source in sources))
    return {"connections": connections, "outcome": dict(outcome)}


async def endless(url: str, seconds: float, start: bytes, more: bytes) -> dict[str, Any]:
    """Four connections that send `start`, then `more` over and over without reading, each
    opened again as soon as the server closes it, for `seconds`: what the server answered
    first on each connection, and the most bytes one connection got in."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    outcome: collections.Counter[str] = collections.Counter()
    most = 0

    async def one() -> None:
        nonlocal most
        while loop.time() < end:
            reader, writer = await open_connection(url)
            sent = 0
            try:
                writer.write(start)
                async with asyncio.timeout(end - loop.time()):
                    while True:
                        writer.write(more)
                        await writer.drain()  # waits while the server reads nothing
                        sent += len(more)
            except TimeoutError:
                return
            except OSError:
                pass  # closed by the server: what did it answer?
            most = max(most, sent)
            try:
                async with asyncio.timeout(1):
                    reply = await reader.read(200)
            except (TimeoutError, OSError) as e:
                outcome[type(e).__name__] += 1
                continue
            writer.close()
            outcome[reply[9:12].decode() if reply.startswith(b"HTTP/1.1 ") else "closed"] += 1

    await asyncio.gather(*(one() for _ in range(4)))
    return {"outcome": dict(outcome), "max_mib_sent": most / MiB}


async def post_loop(
    url: str, seconds: float, concurrency: int, body: bytes, content_type: str, addresses: int = 1
) -> dict[str, Any]:
    """`concurrency` attackers posting `body` in closed loops for `seconds`, from ATTACKER or
    (`addresses` > 1) spread over that many addresses: answers' statuses and how long they
    took."""
    statuses, latencies = collections.Counter(), []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def attacker(client: httpx.AsyncClient) -> None:
        while loop.time() < end:
            started = loop.time()
            try:
                response = await client.post(
                    f"{url}/api/predict", content=body, headers={"Content-Type": content_type}
                )
                statuses[str(response.status_code)] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
            latencies.append(loop.time() - started)

    sources = [ATTACKER] if addresses == 1 else [loopback(n) for n in range(addresses)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(local_address=source),
                    timeout=max(seconds, 30),
                )
            )
            for source in sources
        ]
        await asyncio.gather(*(attacker(clients[n % len(clients)]) for n in range(concurrency)))
    return {"answers": dict(statuses), **percentiles(latencies)}


def slow_images(
    url: str, seconds: float, per_request: int, concurrency: int, png: bytes | None = None
) -> Any:
    """`per_request` copies of `png` (default: `slow_png()`) per request, `concurrency`
    requests at once, each from an address of its own if `png` is given."""
    image = png or slow_png()  # ~0.5 s each: made once
    parts = [("file", (f"slow{n}.png", image)) for n in range(per_request)]
    request = httpx.Request("POST", url, files=parts)
    body, content_type = request.read(), request.headers["content-type"]
    addresses = concurrency if png else 1
    return post_loop(url, seconds, concurrency, body, content_type, addresses)


def full_requests(url: str, seconds: float, concurrency: int = 16) -> Any:
    """`concurrency` requests at once of 64 small digits each (the most a request may hold),
    from one address: 1,024 images, every place in flight were it not for a client's share."""
    png, _ = normal_png()
    request = httpx.Request("POST", url, files=[("file", (f"{n}.png", png)) for n in range(64)])
    return post_loop(url, seconds, concurrency, request.read(), request.headers["content-type"])


def many_parts(url: str, seconds: float, concurrency: int = 2) -> Any:
    body, content_type = many_parts_body()
    return post_loop(url, seconds, concurrency, body, content_type)


# name: (what it does, the attack)
ATTACKS = {
    "slowloris": ("2,500 connections sending half a head", lambda url, s: slowloris(url, s)),
    "images64": (
        "64 slow PNGs per request, 4 requests at once",
        lambda u, s: slow_images(u, s, 64, 4),
    ),
    "images2": (
        "2 slow PNGs per request, 8 requests at once",
        lambda u, s: slow_images(u, s, 2, 8),
    ),
    "multipart": (
        "150,000 tiny parts per request, 2 requests at once",
        lambda u, s: many_parts(u, s),
    ),
    "full_requests": (
        "64 small digits per request, 16 requests at once, from one address",
        lambda u, s: full_requests(u, s),
    ),
    "images_mid": (
        "25 PNGs of 1990x1990 per request (each under the large mark), from 3 addresses",
        lambda u, s: slow_images(u, s, 25, 3, slow_png(1990, 1990)),
    ),
    "idle": ("1,200 connections idle after a request", lambda u, s: held(u, s, IDLE)),
    "idle_many": (
        "1,200 connections idle after a request, from as many addresses",
        lambda u, s: held(u, s, IDLE, many=True),
    ),
    "bodiless": (
        "1,200 connections waiting with their body unsent",
        lambda u, s: held(u, s, BODILESS),
    ),
    "heads": (
        "4 connections sending 1 MiB header lines without end",
        lambda u, s: endless(
            u, s, b"GET /api/info HTTP/1.1\r\nHost: x\r\n", b"X-A: " + b"a" * MiB + b"\r\n"
        ),
    ),
    "pipeline": (
        "4 connections sending pipelined requests, never reading the answers",
        lambda u, s: endless(u, s, b"", b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n" * 4096),
    ),
}


def _attacker(name: str, url: str, seconds: float, results: Any, ready: Any) -> None:
    raise_file_limit()
    attack = ATTACKS[name][1](url, seconds)  # its requests made (slow PNGs take ~0.5 s)
    ready.set()
    results.put(asyncio.run(attack))


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def under_attack(
    name: str | None, url: str, seconds: float, keep_alive: bool = True
) -> dict[str, Any]:
    """The normal client's view while attack `name` runs in another process (from 1.5 s
    after the attacker has made its requests), and the attacker's; `name` None: no attack."""
    if name is None:
        return {"normal": asyncio.run(normal_client(url, seconds, keep_alive))}
    context = multiprocessing.get_context("spawn")
    results, ready = context.Queue(), context.Event()
    attacker = context.Process(target=_attacker, args=(name, url, seconds + 2, results, ready))
    attacker.start()
    if not ready.wait(60):
        raise RuntimeError(f"the attacker did not start (exit code {attacker.exitcode})")
    time.sleep(1.5)  # its connections open
    normal = asyncio.run(normal_client(url, seconds, keep_alive))
    return {"normal": normal, "attacker": _result(attacker, results)}


def _result(attacker: Any, results: Any) -> Any:
    """What the attacker process reported when it ended."""
    while True:
        try:
            outcome = results.get(timeout=1)
        except queue.Empty:
            if not attacker.is_alive():
                raise RuntimeError(f"the attacker exited with {attacker.exitcode}") from None
            continue
        attacker.join(30)
        return outcome


def livez_during(name: str, url: str, seconds: float) -> dict[str, float]:
    """The latency of /livez (the event loop's responsiveness) during attack `name`."""

    async def probe() -> list[float]:
        latencies = []
        async with httpx.AsyncClient(timeout=30) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.monotonic()
                await client.get(f"{url}/livez")
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.01)
        return latencies

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    attacker = context.Process(target=_attacker, args=(name, url, seconds + 2, results))
    attacker.start()
    time.sleep(1.5)
    latencies = asyncio.run(probe())
    _result(attacker, results)
    return {"max_ms": 1000 * max(latencies), **percentiles(latencies)}


def settle(url: str, limit_s: float = 120) -> None:
    """Waits until the server answers a prediction within a second again (a server without
    budgets may still be decoding an attack's images), so attacks do not overlap."""
    png, _ = normal_png()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            response = httpx.post(
                f"{url}/api/predict", content=png, headers={"Content-Type": "image/png"}, timeout=30
            )
            if response.status_code == 200 and time.monotonic() - started < 1:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10, help="Per attack.")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="Comma-separated names.")
    parser.add_argument("--label", default="", help="A name for this server in the table.")
    args = parser.parse_args()
    raise_file_limit()
    server = ServerProcess()
    rows = []
    try:
        for name in [None, *args.attacks.split(",")]:
            # Against slow-loris, the normal client opens a new connection for every request:
            # it must get in while the attacker's connections fill the server.
            keep_alive = name not in ("slowloris", "idle", "idle_many", "bodiless")
            seen = under_attack(name, server.url, args.seconds, keep_alive)
            row = {"attack": name or "none", **seen}
            if name == "multipart":
                row["livez"] = livez_during(name, server.url, args.seconds)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            settle(server.url)
    finally:
        server.stop()
    print(table(rows, args.label))


def errors(counts: dict[str, int]) -> str:
    """`0`, or the count and its kinds: `2 (503: 2)`."""
    kinds = ", ".join(f"{kind}: {n}" for kind, n in counts.items())
    return f"{sum(counts.values())} ({kinds})" if counts else "0"


def table(rows: list[dict], label: str) -> str:
    lines = [
        "| server | attack | normal client: requests | p50 ms | p99 ms | errors | "
        "/livez max ms | attacker saw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        normal, attacker = row["normal"], row.get("attacker", {})
        what = ATTACKS[row["attack"]][0] if row["attack"] in ATTACKS else "none"
        seen = attacker.get("outcome") or attacker.get("answers") or ""
        livez = f"{row['livez']['max_ms']:.0f}" if "livez" in row else ""
        lines.append(
            f"| {label} | {what} | {normal['requests']} | {normal['p50_ms']:.1f} | "
            f"{normal['p99_ms']:.1f} | {errors(normal['errors'])} | {livez} | {json.dumps(seen)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
