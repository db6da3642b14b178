"""The STOMP 1.2 frame codec and protocol detection, without sockets."""

from __future__ import annotations

import pytest

from rpc import connection, stomp


def parse_all(data: bytes, max_body: int = stomp.MAX_BODY) -> list[object]:
    parser = stomp.Parser(max_body)
    parser.feed(data)
    items = []
    while (item := parser.next()) is not None:
        items.append(item)
    return items


def test_frame_with_content_length_may_hold_nul():
    (frame,) = parse_all(b"SEND\ndestination:/q\ncontent-length:3\n\na\0b\0")
    assert frame.command == "SEND" and frame.body == b"a\0b"
    assert frame.headers == {"destination": "/q", "content-length": "3"}


def test_frame_without_content_length_ends_at_nul():
    (frame,) = parse_all(b"SEND\ndestination:/q\n\nhello\0")
    assert frame.body == b"hello"


def test_crlf_lines_and_heart_beats_between_frames():
    items = parse_all(b"\n\r\nSUBSCRIBE\r\nid:1\r\ndestination:/q\r\n\r\n\0\n")
    assert items[:2] == [stomp.HEARTBEAT, stomp.HEARTBEAT]
    assert items[2].headers == {"id": "1", "destination": "/q"}
    assert items[3] == stomp.HEARTBEAT


def test_header_escapes_decoded_except_in_connect():
    (frame,) = parse_all(b"SEND\ndestination:a\\cb\\nc\\rd\\\\e\n\n\0")
    assert frame.headers["destination"] == "a:b\nc\rd\\e"
    (connect,) = parse_all(b"CONNECT\nlogin:a\\cb\n\n\0")
    assert connect.headers["login"] == "a\\cb"


def test_first_of_repeated_headers_wins():
    (frame,) = parse_all(b"SEND\ndestination:first\ndestination:second\n\n\0")
    assert frame.headers["destination"] == "first"


def test_encode_escapes_and_sets_content_length():
    data = stomp.encode("MESSAGE", {"destination": "a:b\n", "content-length": "99"}, b"x\0y")
    assert data == b"MESSAGE\ndestination:a\\cb\\n\ncontent-length:3\n\nx\0y\0"


def test_frame_fed_byte_by_byte():
    data = b"SEND\ndestination:/q\ncontent-length:2\n\nab\0SEND\ndestination:/r\n\ncd\0"
    parser = stomp.Parser()
    frames = []
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
        while (item := parser.next()) is not None:
            frames.append(item)
    assert [(f.headers["destination"], f.body) for f in frames] == [("/q", b"ab"), ("/r", b"cd")]


def test_partial_frame_is_tracked_but_heart_beats_are_not():
    parser = stomp.Parser()
    parser.feed(b"\n\n")
    assert not parser.partial and parser.frame_started is None
    parser.feed(b"SEN")
    assert parser.partial and parser.frame_started is not None


@pytest.mark.parametrize(
    "data, message",
    [
        (b"BOGUS\n\n\0", "Unknown command"),
        (b"SEND\nno colon here\n\n\0", "Malformed header"),
        (b"SEND\ndestination:a\\tb\n\n\0", "Invalid escape"),
        (b"SEND\ncontent-length:x\n\n\0", "Invalid content-length"),
        ("SEND\ncontent-length:\u00b2\n\n\0".encode(), "Invalid content-length"),
        (b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\0", "Invalid content-length"),
        (b"SEND\ncontent-length:1\n\nab\0", "not followed by NUL"),
        (b"SEND\ndestination:\xff\n\n\0", "UTF-8"),
    ],
)
def test_malformed_frames(data, message):
    with pytest.raises(stomp.FrameError, match=message):
        parse_all(data)


def test_declared_body_too_large_is_refused_before_the_body():
    with pytest.raises(stomp.FrameError, match="larger than the maximum"):
        parse_all(b"SEND\ncontent-length:1000\n\n", max_body=100)


def test_body_without_length_too_large():
    with pytest.raises(stomp.FrameError, match="larger than the maximum"):
        parse_all(b"SEND\n\n" + b"x" * 101, max_body=100)


def test_headers_too_long():
    with pytest.raises(stomp.FrameError, match="headers longer"):
        parse_all(b"SEND\nx:" + b"y" * (stomp.MAX_HEADER_BYTES + 1))


def test_too_many_headers():
    headers = b"".join(b"h%d:v\n" % i for i in range(stomp.MAX_HEADERS + 1))
    with pytest.raises(stomp.FrameError, match="More than"):
        parse_all(b"SEND\n" + headers + b"\n\0")


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"CONNECT\n", "stomp"),
        (b"STOMP\r\n", "stomp"),
        (b"SUBSCRIBE\n", "stomp"),
        (b"SEND\ndest", "stomp"),
        (b"\n", "stomp"),
        (b"POST / HTTP/1.1\r\n", "http"),
        (b"CONNECT example:443 HTTP/1.1", "http"),
        (b"GET", "http"),
        (b"SEN", None),
        (b"CONNECT", None),
        (b"", None),
    ],
)
def test_detect(data, kind):
    assert connection.detect(data) == kind
