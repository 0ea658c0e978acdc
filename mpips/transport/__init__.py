"""The transport layer: parameter windows, tagged push messages, pull requests, cheap waits.

Roles call these classes and never MPI point-to-point or RMA directly. Buffers are plain,
contiguous numpy arrays (host memory), so other buffer kinds can replace them later.

One module per concern:

- ``wire``: every wire constant, once (tags, codec ids, status slots), the push header, trailer
  and layout, and the byte formats of pushes, windows and pulls;
- ``chunked``: chunked sends, receives and gets (no MPI call moves more than ``chunk_bytes``),
  and the backoff waits;
- ``window``: ``ParameterWindow``, a server's shard published through RMA, read by workers;
- ``push``: ``Pusher`` (worker) and ``PushReceiver`` (server);
- ``pull``: message pulls (``PullServer``, ``MessagePuller``) where there are no RMA windows;
- ``notice``: bsp notices (``NoticeSender``, ``NoticeReceiver``);
- ``batches``: a data server's batch requests and replies;
- ``control``: a job's control messages (a model registered, a loader opened, a worker done).

Every name is importable from ``mpips.transport`` itself. The wire format is imported with the
package; the modules that make MPI calls only when one of their names is first asked for, so
``mpips.transport.wire`` (which ``mpips.compression`` takes its codec ids from) stays MPI-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from mpips.chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, chunks
from mpips.transport.wire import (
    HEADER_BYTES,
    MAGIC,
    NOTICE_WORDS,
    PROTOCOL,
    PULL_CODECS,
    STREAMED,
    TAIL_MAGIC,
    TRAILER_BYTES,
    WHOLE,
    Codec,
    MalformedMessage,
    PushHeader,
    PushLayout,
    PushTrailer,
    Slot,
    StallError,
    Tag,
    narrow,
    widen,
)

# the names of the modules that make MPI calls, imported when first asked for (``__getattr__``)
_LAZY = {
    "Backoff": "chunked",
    "get_chunks": "chunked",
    "recv_chunks": "chunked",
    "send_chunks": "chunked",
    "wait_all": "chunked",
    "wait_for": "chunked",
    "ParameterWindow": "window",
    "Pusher": "push",
    "PushReceiver": "push",
    "MessagePuller": "pull",
    "PullServer": "pull",
    "NoticeReceiver": "notice",
    "NoticeSender": "notice",
    "poll_control": "control",
    "send_control": "control",
}

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "NOTICE_WORDS",
    "PROTOCOL",
    "STREAMED",
    "TAIL_MAGIC",
    "Backoff",
    "Codec",
    "MalformedMessage",
    "MessagePuller",
    "NoticeReceiver",
    "NoticeSender",
    "ParameterWindow",
    "PullServer",
    "PushHeader",
    "PushLayout",
    "PushTrailer",
    "PULL_CODECS",
    "PushReceiver",
    "Pusher",
    "Slot",
    "StallError",
    "TRAILER_BYTES",
    "Tag",
    "WHOLE",
    "chunks",
    "get_chunks",
    "narrow",
    "poll_control",
    "recv_chunks",
    "send_chunks",
    "send_control",
    "wait_all",
    "wait_for",
    "widen",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
