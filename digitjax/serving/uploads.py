"""Reading the images of one prediction request, in memory and within limits: a multipart
form with `file` parts, or one raw image body. Nothing is written to disk (Starlette's own form
parser spools parts over 1 MiB to temporary files).

The multipart body is parsed chunk by chunk as it arrives, so a body of thousands of tiny parts
is refused at the first part over the limits instead of after parsing all of them on the event
loop, and no chunk costs the loop more than one network read's worth of parsing.
"""

import asyncio
import dataclasses
import struct
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

if TYPE_CHECKING:  # only a type, defined for type checkers
    from python_multipart.multipart import MultipartCallbacks

MiB = 1 << 20
RAW_TYPES = ("image/", "application/octet-stream")
MAX_PART_HEAD = 16 << 10  # a part's headers: a file name and a content type, never this long
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body: int = 8 * MiB
    max_file: int = 4 * MiB
    max_files: int = 64
    max_pixels: int = 50_000_000  # per image: a 48-megapixel phone photo fits
    max_request_pixels: int = 100_000_000  # per request, decoded images summed
    max_client_pixels: int = 100_000_000  # per client address, in requests not yet answered
    max_in_flight: int = 1024  # images admitted and not yet answered
    max_connections: int = 1000  # open connections; more are refused at once
    head_timeout_s: float = 5.0  # to send a request's line and headers
    timeout_s: float = 10.0  # to send the body; then again to be answered

    @property
    def max_client_in_flight(self) -> int:
        """The images one client (address) may have in flight: a quarter of `max_in_flight`,
        and at least one whole request. Without it, one client's 16 connections of 64 images
        each held every place, and every other client got 503."""
        return max(self.max_files, self.max_in_flight // 4)


class Rejected(Exception):
    """A request refused: the HTTP status, a metric label, one sentence for the client."""

    def __init__(self, status: int, reason: str, detail: str, retry: bool = False):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.retry = status, reason, detail, retry


@dataclasses.dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


def png_pixels(data: bytes, max_pixels: int) -> int | None:
    """The pixels a PNG will decode to, from its IHDR chunk, which the format puts first: 0 for
    one over `max_pixels` (the decoder refuses it from that header, decoding nothing); None for
    files that are not PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return 0 if width * height > max_pixels else width * height


def too_many_pixels(limits: Limits, pixels: int) -> Rejected:
    return Rejected(
        413,
        "too_many_pixels",
        f"The images of one request may hold {limits.max_request_pixels:,} pixels in all; "
        f"these hold {pixels:,} or more.",
    )


def file_label(filename: str | None) -> str:
    """How a refusal names a file: its name, or "The image" for a raw body."""
    return filename or "The image"


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The request's images, or Rejected; a body slower than `limits.timeout_s` gets 408."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type != "multipart/form-data" and not media_type.startswith(RAW_TYPES):
        raise Rejected(
            415,
            "media_type",
            f"Content-Type {media_type or 'missing'} is not accepted; send multipart/form-data "
            "with parts named file, or one image with an image/* Content-Type.",
        )
    # A compressed body would be read as image bytes, and answered "not an image".
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise Rejected(
            415,
            "content_encoding",
            f"Content-Encoding {encoding} is not accepted; send the body as it is (image "
            "formats are compressed already).",
        )
    try:
        async with asyncio.timeout(limits.timeout_s):
            if media_type == "multipart/form-data":
                uploads = await _read_multipart(request, content_type, limits)
            else:
                uploads = [Upload(None, await _read_raw(request, limits.max_file))]
    except TimeoutError:
        raise Rejected(
            408,
            "slow_upload",
            f"The request body took longer than {limits.timeout_s:g} s to arrive.",
        ) from None
    except ClientDisconnect:
        raise Rejected(400, "disconnected", "The client closed the connection.") from None
    if not uploads:
        raise Rejected(400, "no_file", "The request holds no image; send parts named file.")
    for upload in uploads:
        if not upload.data:
            raise Rejected(400, "no_file", f"{file_label(upload.filename)} is empty.")
    return uploads


def _too_large(what: str, limit: int) -> Rejected:
    return Rejected(413, "too_large", f"{what} is larger than {limit // MiB} MiB.")


def _malformed(error: FormParserError) -> Rejected:
    return Rejected(400, "malformed", f"The multipart body is malformed ({error}).")


def _check_declared_length(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(what, limit)


async def _read_raw(request: Request, limit: int) -> bytes:
    _check_declared_length(request, limit, "The image")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large("The image", limit)
    return bytes(body)


async def _read_multipart(request: Request, content_type: str, limits: Limits) -> list[Upload]:
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Rejected(400, "malformed", "The multipart Content-Type has no boundary.")
    _check_declared_length(request, limits.max_body, "The request body")
    form = _Form(limits)
    try:  # the parser refuses a boundary over 256 bytes when it is made
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError as e:
        raise _malformed(e) from None
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limits.max_body:
            raise _too_large("The request body", limits.max_body)
        try:
            parser.write(chunk)
        except FormParserError as e:
            raise _malformed(e) from None
    if not form.ended:
        raise Rejected(400, "malformed", "The multipart body ends before its closing boundary.")
    return form.uploads


class _Form:
    """The parser's callbacks: they collect `file` parts and raise Rejected at the first part
    over the limits, which stops the parsing there. PNG files count their pixels against the
    request's budget here already (other formats' headers are read by the workers)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.uploads: list[Upload] = []
        self.parts = self.pixels = 0
        self.ended = False
        self.headers: dict[bytes, bytes] = {}
        self.head_size = 0
        self.field, self.value, self.data = bytearray(), bytearray(), bytearray()

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self.on_head(self.field, data[start:end]),
            "on_header_value": lambda data, start, end: self.on_head(self.value, data[start:end]),
            "on_header_end": self.on_header_end,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_files:
            raise Rejected(
                413,
                "too_many_files",
                f"At most {self.limits.max_files} files (form parts) are accepted per request.",
            )
        self.headers, self.head_size, self.data = {}, 0, bytearray()

    def on_head(self, into: bytearray, data: bytes) -> None:
        self.head_size += len(data)
        if self.head_size > MAX_PART_HEAD:
            raise Rejected(400, "malformed", "A multipart part's headers are too long.")
        into += data

    def on_header_end(self) -> None:
        self.headers[bytes(self.field).lower()] = bytes(self.value)
        self.field.clear()
        self.value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]
        if len(self.data) > self.limits.max_file:
            raise _too_large(file_label(self.filename()), self.limits.max_file)

    def on_part_end(self) -> None:
        if self.disposition().get(b"name") != b"file":
            return
        upload = Upload(self.filename(), bytes(self.data))
        self.uploads.append(upload)
        self.pixels += png_pixels(upload.data, self.limits.max_pixels) or 0
        if self.pixels > self.limits.max_request_pixels:
            raise too_many_pixels(self.limits, self.pixels)

    def on_end(self) -> None:
        self.ended = True

    def disposition(self) -> dict[bytes, bytes]:
        return parse_options_header(self.headers.get(b"content-disposition"))[1]

    def filename(self) -> str | None:
        name = self.disposition().get(b"filename")
        return name.decode("utf-8", "replace") if name else None
