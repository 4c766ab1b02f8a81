"""Stream entries as read (deliveries) and rejected ones (dead letters, contract format)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from processor.core.contract import MAX_DELIVERIES
from processor.core.records import Rejection

Fields = dict[bytes, bytes]

PHASE_PENDING: Final = "pending"  # this consumer's own unacknowledged entries
PHASE_CLAIM: Final = "claim"  # entries claimed from idle (dead) consumers
PHASE_NEW: Final = "new"  # entries never delivered before


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected entry, in the dead-letter format of the stream contract."""

    source_id: str
    reason: str
    detail: str
    fields: Fields

    def to_fields(self, failed_at_ms: int) -> dict[str, str]:
        """The dead-letter stream entry: original fields kept, undecodable bytes as base64."""
        return {
            "source_id": self.source_id,
            "reason": self.reason,
            "detail": self.detail,
            "fields": _fields_json(self.fields),
            "failed_at": str(failed_at_ms),
        }

    @classmethod
    def from_rejection(cls, source_id: str, rejection: Rejection, fields: Fields) -> DeadLetter:
        return cls(source_id, rejection.reason, rejection.detail, fields)

    @classmethod
    def exhausted(cls, source_id: str, deliveries: int, fields: Fields) -> DeadLetter:
        detail = f"delivered {deliveries} times without being acknowledged"
        return cls(source_id, MAX_DELIVERIES, detail, fields)


def _fields_json(fields: Fields) -> str:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = key.decode("utf-8", "backslashreplace")
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[name] = {"$bytes": base64.b64encode(value).decode("ascii")}
    return orjson.dumps(out).decode("utf-8")


@dataclass(slots=True)
class Delivery:
    """A batch of stream entries as read, with the ids to dead-letter unprocessed."""

    entries: list[tuple[str, Fields]]
    exhausted: list[DeadLetter] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)  # pending ids whose entry was trimmed
    phase: str = PHASE_NEW

    def empty(self) -> bool:
        """True when there is nothing to process, dead-letter or acknowledge."""
        return not (self.entries or self.exhausted or self.vanished)

    def all_ids(self) -> list[str]:
        """Every id this delivery must eventually acknowledge."""
        ids = [sid for sid, _ in self.entries]
        ids.extend(letter.source_id for letter in self.exhausted)
        ids.extend(self.vanished)
        return ids
