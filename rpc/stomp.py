"""STOMP 1.2 frame codec: encode frames, parse a byte stream into frames.

A frame is a command line, header lines (``name:value``), an empty line and a
body ended by NUL. Lines end in LF or CRLF. The body is ``content-length``
bytes when that header is given (it may then hold NULs), else everything up
to the first NUL. Between frames, bare EOLs are heart-beats. Header names and
values escape ``\\r \\n : \\`` as ``\\r \\n \\c \\\\`` (except in CONNECT and
CONNECTED frames, which STOMP 1.2 leaves unescaped); the first of repeated
headers wins.

The parser never holds more than one frame: a header block longer than
:data:`MAX_HEADER_BYTES`, more than :data:`MAX_HEADERS` headers, or a body
longer than the parser's ``max_body`` is a :class:`FrameError`, raised as
soon as it is known (a declared ``content-length`` is checked before any of
the body is read).
"""

from __future__ import annotations

import dataclasses
import re
import time

MAX_BODY = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100

# Client frames (STOMP 1.2 section "Client Frames"); DISCONNECT included.
CLIENT_COMMANDS = frozenset({
    "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK",
    "BEGIN", "COMMIT", "ABORT", "DISCONNECT",
})
# The commands a STOMP client can open a connection with (protocol detection).
OPENING_COMMANDS = ("CONNECT", "STOMP", "SUBSCRIBE", "SEND", "UNSUBSCRIBE", "DISCONNECT")

HEARTBEAT = b"\n"

_ESCAPES = {b"\\r": b"\r", b"\\n": b"\n", b"\\c": b":", b"\\\\": b"\\"}
_ESCAPE_RE = re.compile(rb"\\.?", re.DOTALL)
_UNESCAPED = ("CONNECT", "CONNECTED")
_NOT_EOL_RE = re.compile(rb"[^\r\n]")


class FrameError(Exception):
    """The byte stream is not STOMP 1.2; the connection cannot continue."""


@dataclasses.dataclass
class Frame:
    command: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


def encode(command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """One frame's bytes; ``content-length`` is always set from the body."""
    escape = command not in _UNESCAPED
    lines = [command.encode()]
    for name, value in (headers or {}).items():
        if name == "content-length":
            continue
        lines.append(_escape(name, escape) + b":" + _escape(str(value), escape))
    lines.append(b"content-length:%d" % len(body))
    return b"\n".join(lines) + b"\n\n" + body + b"\0"


def _escape(text: str, escape: bool) -> bytes:
    data = text.encode("utf-8")
    if not escape:
        if b"\n" in data or b"\r" in data:
            raise ValueError(f"Header text {text!r} needs escaping in a CONNECT(ED) frame")
        return data
    return (data.replace(b"\\", b"\\\\").replace(b"\r", b"\\r").replace(b"\n", b"\\n")
            .replace(b":", b"\\c"))


def _unescape(data: bytes, escape: bool) -> str:
    if escape and b"\\" in data:
        def one(match: re.Match[bytes]) -> bytes:
            seq = match.group(0)
            if seq not in _ESCAPES:
                raise FrameError(f"Invalid escape sequence {seq!r} in a header")
            return _ESCAPES[seq]
        data = _ESCAPE_RE.sub(one, data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("Header is not valid UTF-8") from None


class Parser:
    """Incremental parser: :meth:`feed` bytes, then take frames with :meth:`next`.

    :meth:`next` answers a :class:`Frame`, :data:`HEARTBEAT` for each bare EOL
    between frames, or None when more bytes are needed.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._frame: Frame | None = None  # headers parsed, body pending
        self._length = -1  # the pending body's content-length, -1 if none
        self._scanned = 0  # how far the buffer was searched for the awaited delimiter
        self.frame_started: float | None = None  # monotonic time a partial frame began

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def partial(self) -> bool:
        """True while part of a frame (not only heart-beats) is buffered."""
        return self._frame is not None or _NOT_EOL_RE.search(self._buf) is not None

    def feed(self, data: bytes) -> None:
        if data:
            self._buf += data
            if self.frame_started is None and self.partial:
                self.frame_started = time.monotonic()

    def next(self) -> Frame | bytes | None:
        if self._frame is None:
            return self._next_head()
        return self._next_body()

    def _next_head(self) -> Frame | bytes | None:
        buf = self._buf
        if buf[:1] == b"\n":
            del buf[:1]
            self._done_if_empty()
            return HEARTBEAT
        if buf[:2] == b"\r\n":
            del buf[:2]
            self._done_if_empty()
            return HEARTBEAT
        if buf == b"\r":
            return None  # a CRLF heart-beat cut in two
        end = buf.find(b"\n\n", max(0, self._scanned - 1))
        end_crlf = buf.find(b"\n\r\n", max(0, self._scanned - 2))
        if end < 0 and end_crlf < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise FrameError(f"Frame headers longer than {MAX_HEADER_BYTES} bytes")
            self._scanned = len(buf)
            return None
        if end < 0 or (0 <= end_crlf < end):
            head, skip = end_crlf, 3
        else:
            head, skip = end, 2
        if head > MAX_HEADER_BYTES:
            raise FrameError(f"Frame headers longer than {MAX_HEADER_BYTES} bytes")
        frame = self._parse_head(bytes(buf[:head]))
        del buf[: head + skip]
        self._scanned = 0
        length = frame.headers.get("content-length")
        self._length = -1
        if length is not None:
            # ASCII digits only, and few of them: "²".isdigit() is true and
            # int() of 5,000 digits raises.
            if not (length.isascii() and length.isdigit() and len(length) <= 12):
                raise FrameError(f"Invalid content-length {length!r}")
            self._length = int(length)
            if self._length > self.max_body:
                raise FrameError(
                    f"Frame body of {self._length} bytes is larger than the maximum "
                    f"{self.max_body}"
                )
        self._frame = frame
        return self._next_body()

    def _parse_head(self, head: bytes) -> Frame:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
        try:
            command = lines[0].decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("Command is not ASCII") from None
        if command not in CLIENT_COMMANDS:
            raise FrameError(f"Unknown command {command[:40]!r}")
        if len(lines) - 1 > MAX_HEADERS:
            raise FrameError(f"More than {MAX_HEADERS} headers")
        escape = command not in _UNESCAPED
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name:
                raise FrameError(f"Malformed header line {line[:80]!r}")
            headers.setdefault(_unescape(name, escape), _unescape(value, escape))
        return Frame(command, headers)

    def _next_body(self) -> Frame | None:
        assert self._frame is not None
        buf = self._buf
        if self._length >= 0:
            if len(buf) <= self._length:
                return None
            if buf[self._length] != 0:
                raise FrameError("Frame body is not followed by NUL")
            end = self._length
        else:
            end = buf.find(b"\0", self._scanned)
            if end < 0:
                if len(buf) > self.max_body:
                    raise FrameError(f"Frame body larger than the maximum {self.max_body}")
                self._scanned = len(buf)
                return None
        frame = self._frame
        frame.body = bytes(buf[:end])
        del buf[: end + 1]
        self._frame = None
        self._scanned = 0
        self.frame_started = None
        if self.partial:
            self.frame_started = time.monotonic()
        return frame

    def _done_if_empty(self) -> None:
        if not self.partial:
            self.frame_started = None
