"""Event-stream framing: botocore's parser reads what we encode, and the splitter only
ever releases whole frames however the bytes are chunked."""

from __future__ import annotations

from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.eventstream import FrameSplitter, encode_frame, exception_frame, iter_frames

frames = st.lists(
    st.tuples(
        st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=3),
        st.binary(max_size=200),
    ),
    min_size=1,
    max_size=6,
)


@given(frames)
def test_botocore_decodes_our_frames(items):
    buffer = EventStreamBuffer()
    buffer.add_data(b"".join(encode_frame(h, p) for h, p in items))
    decoded = list(buffer)
    assert [(m.headers, m.payload) for m in decoded] == list(items)


@given(frames, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30))
def test_splitter_releases_whole_frames_only(items, cuts):
    stream = b"".join(encode_frame(h, p) for h, p in items)
    splitter = FrameSplitter()
    released = b""
    pos = 0
    i = 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        i += 1
        out = splitter.feed(stream[pos : pos + size])
        pos += size
        if out:
            list(iter_frames(out))  # every release parses as whole frames on its own
            released += out
    assert released == stream and splitter.pending == 0


def test_exception_frame_shape():
    (frame,) = iter_frames(exception_frame("internalServerException", "boom"))
    assert frame.headers[":message-type"] == "exception"
    assert frame.headers[":exception-type"] == "internalServerException"
    assert frame.payload == b'{"message":"boom"}'
