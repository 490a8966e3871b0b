"""`digitjax serve` under attack: a real server on a free loopback port, an attacker process
(from 127.0.0.2) running one of `benchmarks/serve_attacks.py`'s attacks, and meanwhile a normal
client (127.0.0.1, one ~1 kB PNG per request, closed loop) that must see no error and a p99
latency within a bound that grows with the host's slowness (`attacked`). Every attack ends
by itself within seconds."""

import collections
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from serve_attacks import BODILESS, raise_file_limit, under_attack
from serve_load import ServerProcess, metric

from digitjax.serving.guard import LINGER_S, MAX_LINGERING
from digitjax.serving.uploads import Limits

# The normal client's p99 under attack, in times its p50 with no attack on the same server
# just before. The worst seen is 25 (the idle floods: it waits in the accept queue behind the
# attacker's reconnections; `images_mid`: for a worker, behind images of ~0.1 s each), on
# this 2-core host in its usual state (6.5 ms with no attack) and in a slow spell (14-18 ms)
# alike, where a fixed bound failed now and then (benchmarks/README.md, *the attack tests'
# bound on a slow host*), and 30 with training tests running beside it, as the suite's other
# worker does; beside the page tests, 57-69 once in a while (`attacked` then measures again).
# What these tests catch is far above: every request failing, or ~100 times (p50 ~0.66 s on
# the usual host: endless heads, images without turns; pipelines 7.9 s).
MAX_SLOWDOWN = 50
MIN_MAX_P99_MS = 250
HEAD_TIMEOUT_S = 5.0  # Limits.head_timeout_s
# The reasons the server's metrics give for the connections it refuses, and their answers.
REFUSED_CONNECTIONS = {"head_timeout": "408", "too_many_connections": "503"}


@pytest.fixture(scope="module")
def server():
    server = ServerProcess()
    try:
        yield server
    finally:
        assert server.stop() == 0


def attacked(server, attack: str, seconds: float, keep_alive: bool = True) -> dict:
    """What `under_attack` saw, once the normal client is found unharmed: no error, and a
    p99 within MAX_SLOWDOWN times its p50 with no attack, measured just before. Over that
    bound, both are measured again: the suite's other worker loads the host more at some
    moments than at others (a browser test beside `images_mid` took its p99 from ~130 ms
    to 430-513 ms), and what these tests catch (~100 times) is over it twice."""
    for _ in range(2):
        unloaded = under_attack(None, server.url, seconds=2)["normal"]
        max_p99_ms = max(MIN_MAX_P99_MS, MAX_SLOWDOWN * unloaded["p50_ms"])
        seen = under_attack(attack, server.url, seconds, keep_alive)
        normal = seen["normal"]
        assert normal["requests"] > 10, normal
        assert not normal["errors"], normal
        if normal["p99_ms"] <= max_p99_ms:
            return seen
    raise AssertionError(f"p99 {normal['p99_ms']:.0f} ms > {max_p99_ms:.0f} ms twice: {normal}")


def assert_refused(answers: dict) -> None:
    """Every request got 413, or its connection closed after the 413 before all of the body
    was sent (the server does not read the rest of a refused body)."""
    assert "413" in answers or "ReadError" in answers, answers
    assert set(answers) <= {"413", "ReadError", "WriteError", "RemoteProtocolError"}, answers


def rejections(server, reason: str) -> float:
    """The server's count of refusals for `reason` so far."""
    return metric(server.url, f'digitjax_rejections_total{{reason="{reason}"}}')


def test_slowloris_connections_are_capped_and_timed_out(server):
    # 2,500 connections sending half a head, against a cap of 1,000: the oldest waiting ones
    # make room for newer ones (503), the rest get 408 at the head deadline; a normal client
    # opening a new connection for every request gets in all along. The server counts each
    # refusal in its metrics (it counted only requests' refusals before).
    before = {reason: rejections(server, reason) for reason in REFUSED_CONNECTIONS}
    seen = attacked(server, "slowloris", HEAD_TIMEOUT_S + 3, keep_alive=False)
    outcome = seen["attacker"]["outcome"]
    assert set(outcome) <= {"408", "503"}, outcome
    assert outcome.get("408", 0) > 0 and outcome.get("503", 0) >= 1500 - 50, outcome
    assert seen["attacker"]["max_s_to_close"] <= HEAD_TIMEOUT_S + 2
    counted = {
        status: rejections(server, reason) - before[reason]
        for reason, status in REFUSED_CONNECTIONS.items()
    }
    assert counted == {"408": outcome.get("408", 0), "503": outcome.get("503", 0)}, counted


def test_slow_images_are_budgeted(server):
    # 64 images of 1 x 49,999,000 pixels per request: refused from their headers (413).
    seen = attacked(server, "images64", 5)
    assert_refused(seen["attacker"]["answers"])
    # Two per request, eight requests at once: the client's budget admits one request at a
    # time (429 for the others), and large images never take every worker.
    seen = attacked(server, "images2", 8)
    assert "429" in seen["attacker"]["answers"] and set(seen["attacker"]["answers"]) <= {
        "200",
        "429",
        "503",
    }


def test_images_just_under_the_large_mark_from_several_clients_take_turns(server):
    # 25 PNGs of 1990x1990 per request from three addresses, each within its budgets: the
    # workers' places go to the clients in turn, a job each, and few wait in the pool itself,
    # so the normal client's image waits behind a few at most (in one queue, first come first
    # served, eight a worker in the pool: p50 0.66 s, p99 0.99 s).
    seen = attacked(server, "images_mid", 6)
    assert "200" in seen["attacker"]["answers"], seen["attacker"]


def test_a_client_with_many_full_requests_holds_only_its_share_of_the_queue(server):
    # 16 requests of 64 images at once from one address: they held all 1,024 places in flight,
    # and the normal client got 503 for nearly every request. The attacker's beyond its share
    # (256) get 429.
    seen = attacked(server, "full_requests", 5)
    answers = seen["attacker"]["answers"]
    assert "200" in answers and "429" in answers and set(answers) <= {"200", "429"}, answers


def test_multipart_floods_are_refused_at_the_first_part_over_the_limit(server):
    seen = attacked(server, "multipart", 5)
    assert_refused(seen["attacker"]["answers"])
    assert seen["attacker"]["p99_ms"] < 1000  # refused as soon as the 65th part begins


@pytest.mark.parametrize("attack", ["idle", "idle_many", "bodiless"])
def test_connections_held_with_a_whole_head_make_room_for_others(server, attack):
    # 1,200 connections against a cap of 1,000, idle after a request (from one address, or
    # each from its own), or with their body unsent (its deadline is 10 s): a normal client
    # from another address, opening a new connection for every request, gets in all along.
    # Idle connections make room first; else the oldest ones of the address that holds the
    # most. Every refused connection reads its 503: closed with the request unread, ~1 in
    # 200 of the `bodiless` attacker's was reset instead (ConnectionResetError); on a loaded
    # host, 1-2 of ~21,000 still were now and then: refusals past the lingering cap (below).
    seen = attacked(server, attack, 6, keep_alive=False)
    assert seen["attacker"]["outcome"].get("503", 0) > 0, seen["attacker"]
    assert set(seen["attacker"]["outcome"]) <= {"503", "200"}, seen["attacker"]


def test_refusals_past_the_lingering_cap_end_their_stream_before_closing(server):
    # The server holds all the connections it may (requests whose body never comes), and
    # MAX_LINGERING refused connections whose clients neither read their 503 nor close. More
    # refusals come, their requests sent at once: each client reads its 503 and the end of
    # the stream. The refusal past the cap was closed at once, its request unread: the kernel
    # sent a reset in place of the end of the stream, and the client got ConnectionResetError
    # before its answer (the `bodiless` attack's few resets in a loaded suite).
    raise_file_limit()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    opened: list[socket.socket] = []

    def connect() -> socket.socket:
        # one address, so a new connection never takes the place of one that holds more
        connection = socket.create_connection((host, int(port)), source_address=("127.0.0.3", 0))
        opened.append(connection)
        connection.sendall(BODILESS)
        return connection

    def refused(connection: socket.socket) -> bool:
        """Answered at once; else the server holds it, waiting for its body."""
        connection.settimeout(0.5)
        try:
            return connection.recv(4096).startswith(b"HTTP/1.1 503")
        except TimeoutError:
            return False

    def answer(connection: socket.socket) -> bytes:
        connection.settimeout(LINGER_S + 5)
        received = b""
        try:
            while data := connection.recv(4096):
                received += data
        except OSError as e:
            return type(e).__name__.encode()
        return received[:12]

    try:
        for _ in range(Limits().max_connections):
            connect()
        # Once one more is refused, none of them awaits its head any longer (a new one would
        # take its place): all wait for their bodies.
        wait_until(lambda: refused(connect()), timeout_s=60)
        unread = [connect() for _ in range(MAX_LINGERING)]  # within LINGER_S, lingering
        past_the_cap = [connect() for _ in range(16)]
        answers = [answer(connection) for connection in past_the_cap + unread]
    finally:
        for connection in opened:
            connection.close()
    assert set(answers) == {b"HTTP/1.1 503"}, collections.Counter(answers)


@pytest.mark.parametrize("attack", ["heads", "pipeline"])
def test_endless_heads_and_pipelines_cost_little(server, attack):
    # Header lines without end are refused past 16 KiB; pipelined requests are read one at
    # a time, as they are answered, and a connection that sends over 32 of them ahead is
    # closed. uvicorn's httptools parser held 1.5 GB of headers, and ~100 MB per MiB of
    # pipelined requests, for a single connection; answering a pipelined flood as fast as it
    # came kept the normal client waiting 7 s (and, capped, ~20 times its unloaded p50 in a
    # slow spell, where the event loop held the GIL 5 ms at a time: `GIL_SWITCH_INTERVAL_S`).
    status = Path(f"/proc/{server.process.pid}/status")
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # peak memory := now
    before = int(status.read_text().split("VmRSS:")[1].split()[0])
    seen = attacked(server, attack, 4)
    peak = int(status.read_text().split("VmHWM:")[1].split()[0])
    assert (peak - before) / 1024 < 64, (peak - before, seen["attacker"])


def wait_until(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("when", ["loading", "compiling"])
def test_a_signal_while_starting_stops_at_once_with_one_line(tmp_path: Path, sig, status, when):
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["digitjax", "serve", "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        if when == "loading":  # JAX is imported: the model is loading, or about to
            wait_until(lambda: "jaxlib" in Path(f"/proc/{process.pid}/maps").read_text())
        else:
            wait_until(lambda: "compiling..." in log.read_text())
        assert "Ready" not in log.read_text()
        process.send_signal(sig)
        assert process.wait(60) == status
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    lines = log.read_text().splitlines()
    assert lines[-1] == f"Stopped by {signal.Signals(sig).name} before it was ready.", lines
    assert "Traceback" not in log.read_text() and "Exception ignored" not in log.read_text()
    # Its preprocessing workers (and multiprocessing's resource tracker) end with it.
    session = ["pgrep", "-s", str(process.pid)]
    wait_until(lambda: subprocess.run(session, capture_output=True).returncode == 1, 10)
