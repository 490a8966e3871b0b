"""`digitjax serve` as users meet it: a real server process on a free loopback port, real HTTP,
the bundled model, MNIST test digits; and the page in a real headless Chromium."""

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import MNIST_DIR, assert_one_line_error, run_digitjax
from PIL import Image
from typer.testing import CliRunner

from digitjax.cli import app
from digitjax.data import read_idx_split
from digitjax.inference.classifier import BUNDLED_MODEL

STARTUP_S = 180  # compiling every batch size on a busy 2-core machine


class Server:
    """`digitjax serve --port 0` in its own process group, its output in a file."""

    def __init__(self, folder: Path, *flags: str):
        self.log_path = folder / "serve.log"
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            ["digitjax", "serve", "--port", "0", *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            start_new_session=True,
        )
        log.close()
        self.url = self.wait_for(r"http://127\.0\.0\.1:\d+").group(0)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log()):
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the server's output:\n{self.log()}")

    def kill(self) -> None:
        """Stops the server and its workers, whatever state the test left them in."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def metric(self, line_start: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(line_start)
        ]
        return sum(values)


def started(folder: Path, *flags: str) -> Server:
    server = Server(folder, *flags)
    try:
        server.wait_for("Ready")
    except BaseException:
        server.kill()
        raise
    return server


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return read_idx_split(MNIST_DIR, "test")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, digits) -> dict[str, Path]:
    """Images as users send them, with their labels in the names."""
    images, labels = digits
    folder = tmp_path_factory.mktemp("uploads")
    canvas = folder / f"canvas_{labels[0]}.png"  # white strokes on a black 280 px canvas
    Image.fromarray(images[0]).resize((280, 280), Image.Resampling.BICUBIC).save(canvas)
    photo = folder / f"photo_{labels[1]}.jpg"  # dark ink on light paper
    Image.fromarray(255 - images[1]).resize((200, 200)).convert("RGB").save(photo)
    blank = folder / "blank.png"
    Image.new("L", (100, 100), 230).save(blank)
    notes = folder / "notes.png"
    notes.write_text("not an image")
    truncated = folder / "truncated.png"
    truncated.write_bytes(canvas.read_bytes()[:200])
    return {
        "canvas": canvas,
        "photo": photo,
        "blank": blank,
        "notes": notes,
        "truncated": truncated,
        "bomb": folder / "bomb.png",
        "huge_bomb": folder / "huge_bomb.png",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The shared server, with the readiness answers seen while it compiled."""
    server = Server(tmp_path_factory.mktemp("serve"))
    try:
        early = []
        while not early or early[-1][0] != 200:
            readyz = httpx.get(f"{server.url}/readyz")
            predict = httpx.post(
                f"{server.url}/api/predict", content=b"x", headers={"Content-Type": "image/png"}
            )
            early.append((readyz.status_code, predict.status_code, predict.headers, readyz))
            time.sleep(0.02)
        server.early = early
        yield server
    finally:
        server.kill()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image: only the pixel limit stops the decoder."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 16)  # the first rows: enough to start decoding
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def post_files(url: str, *paths: Path, **kwargs) -> httpx.Response:
    parts = [("file", (path.name, path.read_bytes())) for path in paths]
    return httpx.post(f"{url}/api/predict", files=parts, timeout=30, **kwargs)


def post_raw(url: str, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(
        f"{url}/api/predict", content=data, headers={"Content-Type": content_type}, timeout=30
    )


def test_not_ready_until_compiled_then_ready(server):
    readyz, predict, headers, response = server.early[0]
    assert (readyz, predict) == (503, 503)
    assert headers["retry-after"] and response.json()["detail"].endswith(".")
    assert server.early[-1][0] == 200
    assert httpx.get(f"{server.url}/livez").json() == {"status": "alive"}
    info = httpx.get(f"{server.url}/api/info").json()
    assert info["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert info["ready"] and info["backend"] == "cpu" and info["model"]["dataset"] == "mnist"
    assert info["model"]["test_accuracy"] >= 0.99 and info["model"]["name"] == "bundled"
    assert "/" not in json.dumps(info["model"])  # no path of the host


def test_raw_body_matches_predict_command(server, files, tmp_path, monkeypatch):
    response = post_raw(server.url, files["canvas"].read_bytes())
    assert response.status_code == 200
    body = response.json()
    [prediction] = body["predictions"]
    assert prediction["digit"] == 7 and prediction["error"] is None
    assert prediction["name"] is None and "image" not in prediction
    assert len(prediction["probabilities"]) == 10
    assert sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert prediction["confidence"] == max(prediction["probabilities"])
    [bundled_step] = (BUNDLED_MODEL / "best").iterdir()
    assert body["model"]["name"] == "bundled" and body["model"]["step"] == int(bundled_step.name)
    # Same preprocessing and model as the command line.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(files["canvas"]), "--json"])
    assert json.loads(result.stdout)[0]["confidence"] == pytest.approx(
        prediction["confidence"], abs=1e-5
    )


def test_several_files_in_order_with_bad_ones_and_the_model_input(server, files):
    files["bomb"].write_bytes(bomb_png(8000, 8000))
    files["huge_bomb"].write_bytes(bomb_png(60_000, 60_000))
    names = ["photo", "notes", "canvas", "blank", "truncated", "bomb", "huge_bomb"]
    response = post_files(server.url, *(files[name] for name in names), params={"image": "true"})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["name"] for p in predictions] == [files[name].name for name in names]
    by_name = dict(zip(names, predictions))
    assert by_name["photo"]["digit"] == 2 and by_name["canvas"]["digit"] == 7
    assert by_name["blank"]["error"] == "no digit found"
    assert "not an image" in by_name["notes"]["error"]
    assert "unreadable" in by_name["truncated"]["error"]
    assert by_name["bomb"]["error"] == "image too large: 8000x8000 pixels, limit 50,000,000"
    assert by_name["huge_bomb"]["error"].startswith("image too large: over")
    for name in ("notes", "blank", "truncated", "bomb", "huge_bomb"):
        assert by_name[name]["digit"] is None and by_name[name]["probabilities"] is None
    seen = by_name["canvas"]["image"]
    assert seen.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(seen.split(",", 1)[1])))
    assert image.size == (28, 28) and np.asarray(image).max() > 200


@pytest.mark.parametrize(
    ("kind", "status", "fragment"),
    [
        ("text", 415, "Content-Type text/plain is not accepted"),
        ("empty raw body", 400, "empty"),
        ("no file part", 400, "no image"),
        ("no boundary", 400, "no boundary"),
        ("truncated multipart", 400, "ends before its closing boundary"),
        ("raw body too large", 413, "larger than 4 MiB"),
        ("file too large", 413, "larger than 4 MiB"),
        ("body too large", 413, "larger than 8 MiB"),
        ("too many files", 413, "At most 64 files"),
        ("bad query", 422, "Invalid query.image"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_sentence(server, files, kind, status, fragment):
    url, png = f"{server.url}/api/predict", files["canvas"].read_bytes()
    big = b"\0" * (5 << 20)
    multipart = "multipart/form-data; boundary=xyz"
    if kind == "text":
        response = httpx.post(url, content=b"hello", headers={"Content-Type": "text/plain"})
    elif kind == "empty raw body":
        response = post_raw(server.url, b"")
    elif kind == "no file part":
        response = httpx.post(url, files=[("picture", ("a.png", png))])
    elif kind == "no boundary":
        response = httpx.post(
            url, content=b"--x--", headers={"Content-Type": "multipart/form-data"}
        )
    elif kind == "truncated multipart":
        body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        response = httpx.post(url, content=body + png, headers={"Content-Type": multipart})
    elif kind == "raw body too large":
        response = post_raw(server.url, big)
    elif kind == "file too large":
        response = httpx.post(url, files=[("file", ("big.png", big))])
    elif kind == "body too large":
        response = httpx.post(url, files=[("file", (f"{n}.png", big[: 3 << 20])) for n in range(3)])
    elif kind == "too many files":
        response = httpx.post(url, files=[("file", (f"{n}.png", png)) for n in range(65)])
    else:
        response = httpx.post(
            url, params={"image": "maybe"}, content=png, headers={"Content-Type": "image/png"}
        )
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert fragment in detail and detail.endswith(".") and ". " not in detail.rstrip(".")
    # ... and the server keeps serving.
    assert post_raw(server.url, png).json()["predictions"][0]["digit"] == 7


def test_metrics_count_requests_batches_and_rejections(server, files):
    before = server.metric('digitjax_requests_total{status="200"}')
    batches = server.metric("digitjax_batch_size_count")
    threads = [
        threading.Thread(target=post_raw, args=(server.url, files["canvas"].read_bytes()))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.metric('digitjax_requests_total{status="200"}') == before + 8
    assert batches < server.metric("digitjax_batch_size_count") <= batches + 8
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "digitjax_request_seconds_bucket",
        "digitjax_queue_depth",
        'digitjax_rejections_total{reason="not_ready"}',
        "digitjax_inference_seconds",
    ):
        assert name in text
    assert "/api/predict" in httpx.get(f"{server.url}/openapi.json").text
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_a_crashed_preprocessing_worker_is_replaced(server, files):
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    workers = [
        pid
        for pid in map(int, children.read_text().split())
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == len(os.sched_getaffinity(0))
    os.kill(workers[0], signal.SIGKILL)
    png = files["canvas"].read_bytes()
    first = post_raw(server.url, png)  # may meet the broken pool: an error for this file only
    assert first.status_code == 200
    crashed = "unreadable image: the decoder crashed"
    assert first.json()["predictions"][0]["error"] in (None, crashed)
    assert post_raw(server.url, png).json()["predictions"][0]["digit"] == 7


def read_response(client: socket.socket) -> str:
    """One whole HTTP response: its head and body may arrive in separate segments."""
    reply = b""
    while True:
        head, _, body = reply.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        if length and len(body) >= int(length.group(1)):
            return reply.decode()
        chunk = client.recv(4096)
        if not chunk:  # closed by the server
            return reply.decode()
        reply += chunk


def test_full_queue_slow_requests_and_slow_uploads_are_answered(tmp_path, files):
    # Batches wait 3 s for more images, so the first two requests sit in the queue until the
    # 1 s timeout answers them; the queue holds 2 images, so a third is refused at once.
    server = started(
        tmp_path, "--max-wait-ms", "3000", "--max-queue", "2", "--timeout", "1", "--max-batch", "8"
    )
    try:
        png = files["canvas"].read_bytes()
        answers = []
        waiting = [
            threading.Thread(target=lambda: answers.append(post_raw(server.url, png)))
            for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        while server.metric("digitjax_queue_depth") < 2:
            time.sleep(0.01)
        refused = post_raw(server.url, png)
        for thread in waiting:
            thread.join()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "The server is busy."
        assert [a.status_code for a in answers] == [503, 503]
        assert answers[0].json()["detail"] == "The request took longer than 1 s."
        assert all(a.headers["retry-after"] for a in answers)
        assert server.metric('digitjax_rejections_total{reason="queue_full"}') == 1
        assert server.metric('digitjax_rejections_total{reason="timeout"}') == 2
        assert server.metric("digitjax_queue_depth") == 0
        # A body that stops arriving is answered too, not waited for forever.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(
                b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png"
                b"\r\nContent-Length: 1000\r\n\r\n" + png[:10]
            )
            reply = read_response(client)
        assert reply.startswith("HTTP/1.1 408"), reply
        assert "took longer than 1 s to arrive." in reply
    finally:
        server.kill()


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(tmp_path, files):
    server = started(tmp_path, "--max-wait-ms", "1500")
    try:
        answers = []
        request = threading.Thread(
            target=lambda: answers.append(post_raw(server.url, files["canvas"].read_bytes()))
        )
        request.start()
        while server.metric("digitjax_queue_depth") < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        request.join()
        assert server.process.wait(30) == 0
        assert answers[0].status_code == 200
        assert answers[0].json()["predictions"][0]["digit"] == 7
        assert "Stopped." in server.log() and "Traceback" not in server.log()
    finally:
        server.kill()


def test_taken_port_and_bad_checkpoint_are_one_line_errors(server, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    result = run_digitjax("serve", "--port", port, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"cannot listen on 127.0.0.1:{port}")
    result = run_digitjax(
        "serve", "--port", "0", "--checkpoint", str(tmp_path / "none"), cwd=tmp_path
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no checkpoint at")


CHROMEDRIVER, CHROMIUM = Path("/usr/bin/chromedriver"), Path("/usr/bin/chromium")


@pytest.fixture
def browser():
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()) and not os.environ.get("CI"):
        pytest.skip("needs Debian's chromium and chromium-driver (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1000,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def strokes_of(digit: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The digit's ink as horizontal pen strokes on the 280 px canvas, one per run of ink
    pixels in a row."""
    strokes = []
    for row in range(28):
        ink = np.flatnonzero(digit[row] > 100)
        if ink.size == 0:
            continue
        runs = np.split(ink, np.flatnonzero(np.diff(ink) > 1) + 1)
        strokes += [
            ((10 * run[0] + 5, 10 * row + 5), (10 * run[-1] + 5, 10 * row + 5)) for run in runs
        ]
    return strokes


def test_page_draw_predict_clear_and_upload(server, browser, digits, files, tmp_path):
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    images, labels = digits
    driver, wait = browser, WebDriverWait(browser, 30)
    driver.get(server.url)
    pad = driver.find_element(By.ID, "pad")
    assert pad.size == {"width": 280, "height": 280}
    summary = json.loads(next(BUNDLED_MODEL.glob("best/*/summary/metadata")).read_text())
    accuracy = f"test accuracy {100 * summary['best']['test_accuracy']:.2f}%"
    wait.until(lambda d: accuracy in d.find_element(By.ID, "model").text)

    # Strokes of a real test digit, drawn with a pen (pointer events), from the canvas centre.
    actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_PEN, "pen"), duration=5)
    for (x0, y0), (x1, y1) in strokes_of(images[3]):
        actions.pointer_action.move_to(pad, int(x0) - 140, int(y0) - 140)
        actions.pointer_action.pointer_down()
        actions.pointer_action.move_to(pad, int(x1) - 140, int(y1) - 140)
        actions.pointer_action.pointer_up()
    actions.perform()

    def shown_digit(d) -> str:
        return d.find_element(By.ID, "digit").text

    wait.until(lambda d: shown_digit(d) != "?")
    time.sleep(0.5)  # the answer to the last stroke's end replaces earlier, partial ones
    driver.save_screenshot(str(tmp_path / "drawn.png"))
    assert shown_digit(driver) == str(labels[3]), f"read {shown_digit(driver)}"
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars li")
    assert len(bars) == 10
    top = [bar for bar in bars if "top" in bar.get_attribute("class")]
    assert [bar.get_attribute("data-digit") for bar in top] == [str(labels[3])]
    assert float(top[0].find_element(By.CLASS_NAME, "pct").text.rstrip("%")) > 50
    assert driver.find_element(By.ID, "seen").get_attribute("src").startswith("data:image/png")

    # A file from the picker, shown with its digit.
    driver.find_element(By.ID, "file-input").send_keys(str(files["photo"]))
    result = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#file-results li"))[0]
    assert files["photo"].name in result.text
    assert result.find_element(By.CLASS_NAME, "file-digit").text == "2"
    driver.save_screenshot(str(tmp_path / "serve.png"))

    def ink() -> int:
        return driver.execute_script(
            "const d = document.getElementById('pad').getContext('2d')"
            ".getImageData(0, 0, 280, 280).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) n += d[i] > 127; return n;"
        )

    drawn = ink()
    driver.find_element(By.ID, "undo").click()
    assert 0 < ink() < drawn
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert ink() == 0 and shown_digit(driver) == "?"
    assert not driver.find_elements(By.CSS_SELECTOR, "#bars li.top")

    # A phone-sized viewport: everything fits its width.
    driver.set_window_size(390, 844)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
