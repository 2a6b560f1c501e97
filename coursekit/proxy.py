"""What a hidden test holds: proxies for the student's functions, classes and
objects, which live in the student's process.

Arguments cross by value; results come back by value when they are plain data and
as handles (``RemoteObject``) otherwise. The student's exceptions are re-raised
here as exceptions that subclass the same builtin type, so ``pytest.raises`` works
as it would on local code, and carry the student's traceback for the feedback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from coursekit import wire
from coursekit.errors import MissingName, StudentCrashed, StudentError

if TYPE_CHECKING:
    from coursekit.session import GradingSession


_ERROR_CLASSES: dict[str, type] = {}


def _error_class(builtin: str) -> type:
    """StudentError mixed with the builtin exception type the student raised (or
    its nearest builtin base), so ``pytest.raises(ValueError)`` matches."""
    import builtins

    base = getattr(builtins, builtin, Exception)
    if not (isinstance(base, type) and issubclass(base, BaseException)) or not issubclass(base, Exception):
        base = Exception
    if base not in (Exception, StudentError) and builtin not in _ERROR_CLASSES:
        _ERROR_CLASSES[builtin] = type(f"Student{builtin}", (StudentError, base), {
            "__init__": StudentError.__init__, "__str__": StudentError.__str__})
    return _ERROR_CLASSES.get(builtin, StudentError)


def _format_frames(session: GradingSession, frames: Any) -> str:
    """The student's own frames (notebook cells); library frames only when the
    error surfaced in none of theirs."""
    frames = [f for f in frames if isinstance(f, dict)] if isinstance(frames, list) else []
    own = [f for f in frames if isinstance(f.get("in"), int)]
    lines = []
    for frame in own or frames[-2:]:
        cell = session.exec_to_cell.get(frame.get("in")) if isinstance(frame.get("in"), int) else None
        where = f"cell #{cell.number}" if cell else f"In[{frame['in']}]" if frame.get("in") else str(frame.get("file"))
        lines.append(f"  {where}, line {frame.get('line')}, in {frame.get('name')}")
        if frame.get("code"):
            lines.append(f"    {frame['code']}")
    return "\n".join(lines)


def decode_reply(session: GradingSession, text: str) -> Any:
    reply = wire.parse(text)
    if not isinstance(reply, dict) or not ({"ok", "error"} & set(reply)):
        raise wire.WireError("the reply from the notebook's process is not well formed")
    if "ok" in reply:
        return wire.decode(reply["ok"], lambda rec: RemoteObject(session, rec))
    error = reply["error"] if isinstance(reply["error"], dict) else {}
    type_name = str(error.get("type", "Exception"))[:100]
    cls = _error_class(str(error.get("builtin", "Exception")))
    raise cls(type_name, str(error.get("message", ""))[:4000], _format_frames(session, error.get("traceback")))


def handle_record(value: Any) -> dict:
    """How a grader-side value that is not plain data crosses: only handles may."""
    if isinstance(value, RemoteObject):
        if value._generation != value._session.generation:
            raise StudentCrashed("an object was lost when your notebook's process restarted "
                                 "(an earlier call hung or crashed it)")
        return value._wire_record()
    raise wire.WireError(f"a {type(value).__qualname__} cannot be sent to the student's process")


class RemoteObject:
    """A handle to an object in the student's process."""

    __slots__ = ("_session", "_id", "_generation", "type_name", "_callable")

    def __init__(self, session: GradingSession, record: dict):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_id", record["id"])
        object.__setattr__(self, "_generation", session.generation)
        object.__setattr__(self, "type_name", str(record.get("type", "object"))[:200])
        object.__setattr__(self, "_callable", bool(record.get("callable")))

    def _request(self, op: str, **fields: Any) -> Any:
        session = self._session
        session.ensure_running()
        if session.generation != self._generation:
            raise StudentCrashed("this object was lost when your notebook's process restarted "
                                 "(an earlier call hung or crashed it)")
        return session.request(op, target=self, **fields)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._request("call", args=args, kwargs=kwargs)

    def keep(self, *args: Any, **kwargs: Any) -> RemoteObject:
        """Call, but keep the result in the student's process (return a handle)."""
        return self._request("call", args=args, kwargs=kwargs, keep=True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._request("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._request("setattr", name=name, value=value)

    def __len__(self) -> int:
        n = self._request("len")
        if type(n) is not int:
            raise TypeError("len() of a student object did not return an int")
        return n

    def __getitem__(self, key: Any) -> Any:
        return self._request("getitem", key=key)

    def __iter__(self):
        items = self._request("list")
        if not isinstance(items, list):
            raise TypeError("iterating a student object did not give a list")
        return iter(items)

    def isinstance(self, path: str) -> bool:
        answer = self._request("isinstance", path=path)
        return answer is True

    def __repr__(self) -> str:
        return f"<student {self.type_name} #{self._id}>"

    # A handle crosses back to the student's process as a reference.
    def _wire_record(self) -> dict:
        return {wire.TAG: "handle", "id": self._id}


@dataclass
class BackwardResult:
    output: Any
    grads: list
    param_grads: dict


class Student:
    """The ``student`` fixture: the notebook's names, library objects, and probes."""

    def __init__(self, session: GradingSession):
        self._session = session
        self._kept: dict[str, tuple[int, Any]] = {}

    def __getattr__(self, name: str) -> RemoteObject:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._session.request("lookup", name=name)
        except StudentError as exc:
            if exc.type_name != "NameError":
                raise
            raise MissingName(self._missing_message(name)) from None

    def _missing_message(self, name: str) -> str:
        message = (f"Your notebook does not define `{name}`. Check the spelling of the name and that "
                   "the cell defining it runs without errors.")
        errors = self._session.log.cell_errors
        if errors:
            message += " These cells raised when the grader ran them: " + "; ".join(
                e.describe() for e in errors[:3])
        return message

    def kept(self, key: str, make: Callable[[], Any]) -> Any:
        """What make() builds in the student's process (handles: a large vocabulary sent once,
        say), built once per process and shared by the tests after it; built again after a
        restart of the process, whose handles are dead."""
        self._session.ensure_running()
        generation, value = self._kept.get(key, (None, None))
        if generation != self._session.generation:
            value = make()
            self._kept[key] = (self._session.generation, value)
        return value

    def lib(self, path: str) -> RemoteObject:
        """A library object (``torch.optim.AdamW``) inside the student's process."""
        return self._session.request("lib", path=path)

    def backward(self, fn: RemoteObject, *args: Any, grad_outputs: Any = None, **kwargs: Any) -> BackwardResult:
        answer = fn._request("backward", args=args, kwargs=kwargs, grad_outputs=grad_outputs)
        if not isinstance(answer, dict) or "grads" not in answer:
            raise wire.WireError("the backward probe's answer is not well formed")
        return BackwardResult(answer.get("output"), list(answer["grads"]), dict(answer.get("param_grads") or {}))
