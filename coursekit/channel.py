"""The direct line between the grader and the runtime in the student's kernel.

Once the notebook's cells have run, the grader opens a Unix socket in the kernel's own
folder and asks the kernel, in one last execution that never ends, to connect to it and
serve. Every request is then a frame on that socket, answered by a frame: no IPython cell
per request, no Jupyter messages. A frame is a header (payload length, request id) and a
UTF-8 JSON payload in the wire format (coursekit.wire); the grader never unpickles or runs
anything that comes back.

The grader's side has a deadline on every wait and a size cap on every frame, so a kernel
that stops reading, stops answering or sends garbage costs a timeout, never a hang.
"""
from __future__ import annotations

import select
import socket
import struct
import time

HEADER = struct.Struct(">IQ")   # payload bytes, request id
MAX_FRAME = (1 << 30) + 1024     # a reply of up to 1 GiB of JSON (a large tensor), plus its envelope
_CHUNK = 1 << 20


class ChannelClosed(Exception):
    """The other side closed the connection or sent something that is not a frame."""


class ChannelTimeout(Exception):
    """No complete frame before the deadline."""


# -- the kernel's side: plain blocking calls in the kernel's main thread ------------------------


def send_frame(sock: socket.socket, request_id: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload), request_id) + payload)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next frame, or None once the grader has closed the connection."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    size, request_id = HEADER.unpack(header)
    payload = _recv_exactly(sock, size) if size else b""
    return None if payload is None else (request_id, payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(min(size - len(buffer), _CHUNK))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


# -- the grader's side: every wait under a deadline ------------------------------------------


class GraderChannel:
    def __init__(self, sock: socket.socket, alive=lambda: True):
        sock.setblocking(False)
        self.sock = sock
        self.alive = alive           # polled while waiting: a dead kernel ends the wait at once
        self._buffer = bytearray()

    def send(self, request_id: int, payload: bytes, deadline: float) -> None:
        data = memoryview(HEADER.pack(len(payload), request_id) + payload)
        while data:
            if time.monotonic() >= deadline:
                raise ChannelTimeout()
            try:
                sent = self.sock.send(data[:_CHUNK])
            except BlockingIOError:  # the kernel is not reading: wait for room, under the deadline
                self._wait(deadline, write=True)
                continue
            except OSError as exc:
                raise ChannelClosed(f"the connection to the notebook's process broke: {exc}") from None
            data = data[sent:]

    def receive(self, deadline: float) -> tuple[int, bytes]:
        """The next whole frame."""
        header = self._take(HEADER.size, deadline)
        size, request_id = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ChannelClosed(f"the notebook's process sent a reply of {size} bytes, more than the grader reads")
        return request_id, self._take(size, deadline)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _take(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            if time.monotonic() >= deadline:  # a kernel trickling bytes runs out of time too
                raise ChannelTimeout()
            try:
                chunk = self.sock.recv(max(size - len(self._buffer), _CHUNK))
            except BlockingIOError:  # nothing yet: wait for it, under the deadline
                self._wait(deadline)
                continue
            except OSError as exc:
                raise ChannelClosed(f"the connection to the notebook's process broke: {exc}") from None
            if not chunk:
                raise ChannelClosed("the notebook's process closed its connection to the grader")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _wait(self, deadline: float, write: bool = False) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelTimeout()
            ready = select.select([], [self.sock], [], min(remaining, 1.0)) if write else \
                select.select([self.sock], [], [], min(remaining, 1.0))
            if ready[0] or ready[1]:
                return
            if not self.alive():
                raise ChannelClosed("the notebook's process exited")
