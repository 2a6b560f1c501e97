"""Late work: when a submission was handed in, against its lab's due date and the
student's extension, and what the lab's late policy takes off for it.

The raw score is never changed: a penalty is a percentage of it, applied on top
wherever a grade is reported (grades.csv, nbgrader's gradebook, the exports, the
student's feedback).

When a notebook was handed in comes from a timestamp file, in nbgrader's format
(``2026-12-01 23:59:00.123456 UTC``; any ISO 8601 date and time, read as UTC when it
names no zone): nbgrader's ``submitted/<student>/<lab>/timestamp.txt``, or for a
notebook outside such a tree ``<notebook name without .ipynb>.timestamp.txt`` beside it.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

from coursekit.config import Lab

NBGRADER_TIMESTAMP = "timestamp.txt"
LOOSE_TIMESTAMP_SUFFIX = ".timestamp.txt"
DAY = dt.timedelta(days=1)


class TimestampError(ValueError):
    pass


def timestamp_file(notebook: Path, in_nbgrader_tree: bool) -> Path:
    if in_nbgrader_tree:
        return notebook.parent / NBGRADER_TIMESTAMP
    return notebook.with_name(notebook.stem + LOOSE_TIMESTAMP_SUFFIX)


def read_timestamp(notebook: Path, in_nbgrader_tree: bool) -> dt.datetime | None:
    """When the notebook was handed in (UTC), or None where no timestamp file says."""
    path = timestamp_file(notebook, in_nbgrader_tree)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise TimestampError(f"{path}: cannot be read ({exc})") from None
    try:
        return parse_timestamp(text)
    except ValueError:
        raise TimestampError(f"{path}: {text[:60]!r} is not a date and time; write it as nbgrader does, "
                             "e.g. 2026-12-01 23:59:00 UTC (or ISO 8601, e.g. 2026-12-01T23:59:00Z)") from None


def parse_timestamp(text: str) -> dt.datetime:
    """nbgrader's "%Y-%m-%d %H:%M:%S.%f %Z" (a zone name or a +HHMM offset last), or ISO 8601."""
    from dateutil import parser, tz

    date_time, _, zone = text.rpartition(" ")
    if date_time and zone[:1].isalpha():
        zone_info = tz.gettz(zone)
        if zone_info is None:
            raise ValueError(f"unknown time zone {zone!r}")
        when = parser.isoparse(date_time.replace(" ", "T", 1)).replace(tzinfo=zone_info)
    else:
        when = parser.isoparse(text.replace(" ", "T", 1).replace(" ", ""))
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


@dataclass(frozen=True)
class Lateness:
    """One submission against its due date: what the grade reports carry beside the raw score."""
    submitted: dt.datetime | None       # None: no timestamp, so never late
    due: dt.datetime | None             # this student's, extension included; None: the lab has none
    extension_days: float = 0.0
    days_late: int = 0                  # past `due`, a started day counting as one
    percent: float = 0.0                # of the raw score, taken off
    past_cutoff: bool = False

    def penalty(self, score: float) -> float:
        return round(score * self.percent / 100, 4)

    def final(self, score: float) -> float:
        return round(score - self.penalty(score), 4)

    def describe(self) -> str:
        """One sentence for the student; empty where there is nothing to say."""
        if self.submitted is None or self.due is None:
            return ""
        extended = f", with your {self.extension_days:g}-day extension" if self.extension_days else ""
        head = f"Submitted {_when(self.submitted)}"
        if not self.days_late:
            return f"{head}, on time (due {_when(self.due)}{extended})."
        late = f"{head}, {self.days_late} day(s) after the due date ({_when(self.due)}{extended})"
        if self.past_cutoff:
            return f"{late}, past the last date late work is accepted: it scores 0."
        if self.percent:
            return f"{late}: a late penalty of {self.percent:g}% of your score applies."
        return f"{late}: this lab takes no late penalty."

    def to_json(self) -> dict:
        return {"submitted": _iso(self.submitted), "due": _iso(self.due), "extension_days": self.extension_days,
                "days_late": self.days_late, "penalty_percent": self.percent, "past_cutoff": self.past_cutoff}

    @classmethod
    def from_json(cls, data: dict | None) -> Lateness:
        """The record results.json keeps; results without one were never assessed (on time)."""
        if not isinstance(data, dict):
            return cls(None, None)
        when = lambda v: dt.datetime.fromisoformat(v) if v else None  # noqa: E731
        return cls(when(data.get("submitted")), when(data.get("due")), float(data.get("extension_days", 0)),
                   int(data.get("days_late", 0)), float(data.get("penalty_percent", 0)),
                   bool(data.get("past_cutoff", False)))


def assess(lab: Lab, student: str, submitted: dt.datetime | None) -> Lateness:
    """The lab's policy applied to one submission. An extension moves the student's
    due date and cutoff alike."""
    extension = lab.extensions.get(student, 0.0)
    if lab.due is None or submitted is None:
        return Lateness(submitted, None, extension)
    due = lab.due + extension * DAY
    if submitted <= due:
        return Lateness(submitted, due, extension)
    days = math.ceil((submitted - due) / DAY)
    policy = lab.late
    if policy is None:
        return Lateness(submitted, due, extension, days)
    past_cutoff = policy.cutoff is not None and submitted > policy.cutoff + extension * DAY
    percent = 100.0 if past_cutoff else min(policy.percent_per_day * days, policy.max_percent)
    return Lateness(submitted, due, extension, days, float(percent), past_cutoff)


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


def _when(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
