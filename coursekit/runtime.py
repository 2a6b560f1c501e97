"""The part of the engine that lives inside the student's kernel.

It answers the grader's requests (look up a name, call it, read an attribute,
run a backward probe), one frame each on the socket of coursekit.channel. It holds
no test code, no expected value and no result: it only runs the student's objects
on the arguments it is sent and encodes what comes back.

The grader never trusts what this module says beyond its shape: whatever the
student does to it (monkeypatching included) can only make their own answers
wrong, because every value is checked in the grader's process.
"""
from __future__ import annotations

import importlib
import traceback
from typing import Any

import torch

from coursekit import channel, wire

# Bound at import, before any student cell runs (see wire.py).
from builtins import BaseException, callable, getattr, id, isinstance, len, list, next, setattr, str, type  # noqa: A004

_INTERNAL_FILES = (__file__, wire.__file__, channel.__file__)


class Runtime:
    def __init__(self, shell):
        self.shell = shell
        self.objects: dict[int, Any] = {}
        self._ids: dict[int, int] = {}  # id(obj) -> handle, so one object keeps one handle
        self._in_student_code = False

    # -- handles ------------------------------------------------------------------

    def handle_of(self, obj: Any) -> dict:
        key = id(obj)
        hid = self._ids.get(key)
        if hid is None or self.objects.get(hid) is not obj:
            hid = len(self.objects) + 1
            self.objects[hid] = obj
            self._ids[key] = hid
        kind = type(obj)
        return {wire.TAG: "handle", "id": hid, "type": f"{kind.__module__}.{kind.__qualname__}",
                "callable": callable(obj)}

    def resolve(self, record: dict) -> Any:
        try:
            return self.objects[record["id"]]
        except KeyError:
            raise LookupError("this object no longer exists in the student process") from None

    def encode(self, value: Any, keep: bool = False) -> Any:
        if keep:
            return self.handle_of(value)
        return wire.encode(value, self.handle_of)

    def decode(self, data: Any) -> Any:
        return wire.decode(data, self.resolve, grad=True)

    # -- requests -------------------------------------------------------------------

    def serve(self, path: str, token: str) -> None:
        """Connect to the grader's socket and answer its requests, one frame each, until
        it closes the connection. Runs as the kernel's last execution, in its main thread,
        so that an interrupt from the grader (SIGINT) lands in the student's code."""
        import signal
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        channel.send_frame(sock, 0, token.encode())
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            while True:
                frame = channel.recv_frame(sock)
                if frame is None:
                    return
                request_id, payload = frame
                text = None
                try:
                    self._in_student_code = True
                    text = self.answer(payload.decode("utf-8"))
                    self._in_student_code = False
                except BaseException as exc:  # noqa: BLE001  an interrupt that landed just outside answer()
                    self._in_student_code = False
                    text = text if text is not None else _json({"error": self.describe(exc)})
                channel.send_frame(sock, request_id, text.encode("utf-8"))
        finally:
            signal.signal(signal.SIGINT, previous)
            sock.close()

    def _on_interrupt(self, signum, frame) -> None:
        """The grader interrupts a call that ran past its deadline; an interrupt that
        arrives once the call has answered is late, and dropped."""
        if self._in_student_code:
            raise KeyboardInterrupt

    def answer(self, request_text: str) -> str:
        try:
            request = wire.loads(request_text, self.resolve, grad=True)
            reply = {"ok": self.encode(*self._run(request))}
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, SystemExit included
            reply = {"error": self.describe(exc)}
        try:
            return _json(reply)
        except BaseException as exc:  # noqa: BLE001
            return _json({"error": self.describe(exc)})

    def _run(self, request: dict) -> tuple[Any, bool]:
        op = request["op"]
        keep = bool(request.get("keep", False))
        if op == "lookup":
            name = request["name"]
            if name not in self.shell.user_ns:
                raise NameError(name)
            return self.shell.user_ns[name], True
        if op == "lib":
            return _import_path(request["path"]), True
        target = request["target"]
        if op == "call":
            return target(*request.get("args", ()), **request.get("kwargs", {})), keep
        if op == "getattr":
            return getattr(target, request["name"]), False
        if op == "setattr":
            setattr(target, request["name"], request["value"])
            return None, False
        if op == "len":
            return len(target), False
        if op == "getitem":
            return target[request["key"]], False
        if op == "list":
            return list(target), False
        if op == "isinstance":
            return isinstance(target, _import_path(request["path"])), False
        if op == "backward":
            return self._backward(target, request), False
        raise ValueError(f"unknown request {op!r}")

    def _backward(self, fn, request: dict) -> dict:
        args = request.get("args", ())
        output = fn(*args, **request.get("kwargs", {}))
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        grad_outputs = request.get("grad_outputs")
        if grad_outputs is None:
            first = next(o for o in outputs if isinstance(o, torch.Tensor))
            pairs = [(first, torch.ones_like(first))]
        else:
            if not isinstance(grad_outputs, (tuple, list)):
                grad_outputs = (grad_outputs,)
            pairs = [(o, g.to(o.device, o.dtype)) for o, g in zip(outputs, grad_outputs)
                     if g is not None and isinstance(o, torch.Tensor)]
        total = sum((o * g).sum() for o, g in pairs if o.requires_grad)
        if isinstance(total, torch.Tensor):
            total.backward()
        result = {"output": output,
                  "grads": [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]}
        if isinstance(fn, torch.nn.Module):
            result["param_grads"] = {n: p.grad for n, p in fn.named_parameters()}
        return result

    # -- errors ---------------------------------------------------------------------

    def describe(self, exc: BaseException) -> dict:
        builtin = next((k.__name__ for k in type(exc).__mro__
                        if k.__module__ == "builtins" and k is not object), "Exception")
        try:
            message = str(exc)
        except BaseException:  # noqa: BLE001 - a hostile __str__
            message = "<the exception's message could not be read>"
        return {"type": type(exc).__name__, "builtin": builtin, "message": message[:4000],
                "traceback": self.format_traceback(exc)}

    def format_traceback(self, exc: BaseException) -> list[dict]:
        """Frames of the student's own code: execution count (In[n]) when the frame
        is a notebook cell, else the file name; the runtime's frames are left out."""
        frames = []
        cell_names = getattr(getattr(self.shell, "compile", None), "_filename_map", {}) or {}
        try:
            for frame in traceback.extract_tb(exc.__traceback__):
                if frame.filename in _INTERNAL_FILES:
                    continue
                frames.append({"in": cell_names.get(frame.filename), "file": frame.filename,
                               "line": frame.lineno, "name": frame.name, "code": (frame.line or "")[:300]})
        except BaseException:  # noqa: BLE001
            pass
        return frames[-20:]


def _json(reply: dict) -> str:
    return wire._json_dumps(reply, allow_nan=False, separators=(",", ":"))


def _import_path(path: str) -> Any:
    """``package.module.attr.attr``: import the longest importable prefix, then getattr."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {path!r} in the student process")


class CappedStream:
    """Wraps the kernel's stdout/stderr so that a notebook printing gigabytes sends
    the grader a bounded amount: past the cap, output is dropped with one notice."""

    def __init__(self, stream, cap: int):
        self._stream = stream
        self._left = cap

    def write(self, text: str) -> int:
        if self._left > 0:
            piece = text[: self._left]
            self._left -= len(piece)
            self._stream.write(piece)
            if self._left <= 0:
                self._stream.write("\n[output truncated by the grader]\n")
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def full_float32() -> None:
    """Grading compares float32 results with float64 oracles at tolerances a
    correct float32 implementation meets; TF32 matrix products (on by default in
    NGC images through TORCH_ALLOW_TF32_CUBLAS_OVERRIDE) move them by ~1e-3. So
    both sides of grading turn TF32 off rather than loosening every tolerance."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def tf32_state() -> dict:
    """Whether float32 matrix products may use TF32 in this process, as plain values."""
    import torch

    return {"cublas": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32),
            "matmul_precision": str(torch.get_float32_matmul_precision())}


def install(shell, output_cap: int = 1 << 20) -> Runtime:
    import sys

    full_float32()
    runtime = Runtime(shell)
    globals()["current"] = runtime
    sys.stdout = CappedStream(sys.stdout, output_cap)
    sys.stderr = CappedStream(sys.stderr, output_cap)
    return runtime
