"""Reading an HTTP upload into memory with hard limits, and telling its type by content.

Starlette's form parser spools files above 1 MiB to a temporary file on disk and applies no
size limit to file parts. A medical image upload should do neither: :func:`read_multipart`
parses the ``multipart/form-data`` body as it streams in, keeps everything in memory and stops
with :class:`UploadError` (413) the moment the file part, or the whole body, passes its limit,
whatever ``Content-Length`` claimed, and (408) when the body takes longer than its time limit
(a client sending a byte every half second would otherwise hold memory and a slot forever).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pneumoscope.data.decode import SUPPORTED_FORMATS as SUPPORTED_TYPES
from pneumoscope.data.decode import sniff_format as sniff_type

# Room for the multipart boundaries, part headers and the small text fields around the file.
BODY_OVERHEAD = 64 * 1024
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8


class UploadError(Exception):
    """A request whose upload cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class Upload:
    """The parsed form: the bytes of the ``file`` field (None when absent) and the text fields."""

    file: bytes | None = None
    fields: dict[str, str] = field(default_factory=dict)


def too_large_message(max_upload_bytes: int) -> str:
    return f"upload too large: the limit is {max_upload_bytes / 2**20:.3g} MiB"


class _FormCollector:
    """python-multipart callbacks that collect the parts in memory, with the limits."""

    def __init__(self, max_upload_bytes: int) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.upload = Upload()
        self.ended = False
        self.parts = 0
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(400, f"too many form fields (at most {MAX_PARTS})")
        self._headers.clear()
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.extend(data[start:end])

    def on_header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        # The client's file name is never used: not for a path, not in logs (it may name a patient).
        self._is_file = b"filename" in options or self._name == "file"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.extend(data[start:end])
        if self._is_file:
            if len(self._data) > self.max_upload_bytes:
                raise UploadError(413, too_large_message(self.max_upload_bytes))
        elif len(self._data) > MAX_FIELD_BYTES:
            raise UploadError(400, f"form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._name == "file":
            if self.upload.file is not None:
                raise UploadError(400, "more than one 'file' field: send one image per request")
            self.upload.file = bytes(self._data)
        elif not self._is_file:  # other file fields are ignored
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")
        self._data = bytearray()

    def on_end(self) -> None:
        self.ended = True


async def read_multipart(content_type: str | None, content_length: str | None,
                         stream: AsyncIterator[bytes], max_upload_bytes: int,
                         timeout: float | None = None) -> Upload:
    """Parse a ``multipart/form-data`` body from ``stream`` into memory.

    Raises :class:`UploadError`: 413 when the file (or the body) is larger than allowed, 408 when
    the whole body has not arrived within ``timeout`` seconds (None: no limit), 400 for a body
    that is not well-formed multipart or has too many or too long fields.
    """
    import anyio
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    max_body = max_upload_bytes + BODY_OVERHEAD
    if content_length is not None:  # a quick refusal; the stream is still counted below
        try:
            declared = int(content_length)
        except ValueError as exc:
            raise UploadError(400, "invalid Content-Length header") from exc
        if declared > max_body:
            raise UploadError(413, too_large_message(max_upload_bytes))
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(400, "expected a multipart/form-data body with the image in a field "
                          "named 'file' (e.g. curl -F file=@chest.png)")

    form = _FormCollector(max_upload_bytes)
    parser = MultipartParser(params[b"boundary"], form.callbacks())
    received = 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in stream:
                received += len(chunk)
                if received > max_body:
                    raise UploadError(413, too_large_message(max_upload_bytes))
                parser.write(chunk)
        parser.finalize()
    except TimeoutError as exc:
        raise UploadError(408, f"upload too slow: the body did not arrive within {timeout:g} s "
                          f"({received} bytes received)", headers={"Connection": "close"}) from exc
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from exc
    if not form.ended:
        raise UploadError(400, "incomplete multipart body")
    return form.upload


__all__ = ["SUPPORTED_TYPES", "Upload", "UploadError", "read_multipart", "sniff_type"]
