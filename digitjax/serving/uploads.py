"""Reading the images of one prediction request, in memory and within limits: a multipart
form with `file` parts, or one raw image body. Nothing is written to disk (Starlette's own form
parser spools parts over 1 MiB to temporary files)."""

import dataclasses

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

MiB = 1 << 20
RAW_TYPES = ("image/", "application/octet-stream")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body: int = 8 * MiB
    max_file: int = 4 * MiB
    max_files: int = 64
    max_pixels: int = 50_000_000  # a 48-megapixel phone photo fits
    max_in_flight: int = 1024  # images admitted and not yet answered
    timeout_s: float = 10.0


class Rejected(Exception):
    """A request refused before any work: the HTTP status, a metric label, one sentence."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclasses.dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    is_multipart = media_type == "multipart/form-data"
    if not is_multipart and not media_type.startswith(RAW_TYPES):
        raise Rejected(
            415,
            "media_type",
            f"Content-Type {media_type or 'missing'} is not accepted; send multipart/form-data "
            "with parts named file, or one image with an image/* Content-Type.",
        )
    body = await _read_body(request, limits.max_body if is_multipart else limits.max_file)
    uploads = _parse_multipart(body, content_type, limits) if is_multipart else [Upload(None, body)]
    if not uploads:
        raise Rejected(400, "no_file", "The request holds no image; send parts named file.")
    if any(not upload.data for upload in uploads):
        raise Rejected(400, "no_file", "An uploaded file is empty.")
    return uploads


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = Rejected(413, "too_large", f"The request body is larger than {limit // MiB} MiB.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise Rejected(400, "disconnected", "The client closed the connection.") from None
    return bytes(body)


def _parse_multipart(body: bytes, content_type: str, limits: Limits) -> list[Upload]:
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Rejected(400, "malformed", "The multipart Content-Type has no boundary.")
    parts: list[dict] = []
    field, value = bytearray(), bytearray()
    ended = False

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_end() -> None:
        parts[-1]["headers"][bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]
        if len(parts[-1]["data"]) > limits.max_file:
            raise Rejected(413, "too_large", f"A file is larger than {limits.max_file // MiB} MiB.")

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_end": on_end,
    }
    try:
        MultipartParser(boundary, callbacks).write(body)
    except FormParserError as e:
        raise Rejected(400, "malformed", f"The multipart body is malformed ({e}).") from None
    if not ended:
        raise Rejected(400, "malformed", "The multipart body ends before its closing boundary.")
    uploads = []
    for part in parts:
        disposition = parse_options_header(part["headers"].get(b"content-disposition"))[1]
        if disposition.get(b"name") == b"file":
            filename = disposition.get(b"filename")
            uploads.append(
                Upload(
                    filename.decode("utf-8", "replace") if filename else None, bytes(part["data"])
                )
            )
    if len(uploads) > limits.max_files:
        raise Rejected(
            413, "too_many_files", f"At most {limits.max_files} files are accepted per request."
        )
    return uploads
