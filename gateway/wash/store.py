"""The wash bays' rows: what `WashService` reads at start and stores afterwards.

Contract: every method runs on the wash service's database thread (`DbThread`), never on the
event loop; each write is one IMMEDIATE transaction holding the facts and their outbox events
(`wash.session`, coalescible `wash.status`, `wash.reset`), so a fact and its event for the cloud
commit together. `WashStore(db, site_id, zone)` does no I/O.
"""

from __future__ import annotations

import datetime as dt
import logging
import zoneinfo
from dataclasses import dataclass

from peewee import SqliteDatabase

from gateway.clock import iso_z
from gateway.store import write_tx
from gateway.store.models import Bay, BayReset, WashSession
from gateway.store.outbox import add_event
from gateway.wash.machine import CloseSession, OpenSession, ResetDone, View

log = logging.getLogger(__name__)

# What one transaction stores for a bay: id, name, the view, its sessions to open or close.
Persist = tuple[str, str, View, list[OpenSession | CloseSession]]


@dataclass(frozen=True)
class LoadedBay:
    """A bay as the store had it at start: its row, its open session, today's last session number."""

    row: Bay | None
    open_session: WashSession | None
    day: str
    day_seq: int


def naive_utc(ts: float) -> dt.datetime:
    """Epoch seconds as the naive UTC datetime the tables hold."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None)


class WashStore:
    def __init__(self, db: SqliteDatabase, site_id: str, zone: zoneinfo.ZoneInfo) -> None:
        self.db = db
        self.site_id = site_id
        self.zone = zone

    def load(self, bay_ids: list[str]) -> dict[str, LoadedBay]:
        """Each bay's row, open session and today's last session number (site time zone)."""
        out: dict[str, LoadedBay] = {}
        today = dt.datetime.now(self.zone).strftime("%Y%m%d")
        for bay_id in bay_ids:
            row = Bay.get_or_none(Bay.bay_id == bay_id)
            open_session = (WashSession.select().where((WashSession.bay == bay_id) & WashSession.end_time.is_null())
                            .order_by(WashSession.id.desc()).first())
            last = (WashSession.select().where((WashSession.bay == bay_id) & (WashSession.local_day == today))
                    .order_by(WashSession.seq.desc()).first())
            out[bay_id] = LoadedBay(row, open_session, today if last else "", last.seq if last else 0)
        return out

    def ensure_rows(self, bays: list[tuple[str, str, View]]) -> None:
        """Create the row of every configured bay (id, name, initial view) that has none."""
        with write_tx(self.db):
            for bay_id, name, v in bays:
                if Bay.get_or_none(Bay.bay_id == bay_id) is None:
                    Bay.create(bay_id=bay_id, name=name, state=v.state, progress=v.progress, course=v.course,
                               error_code=v.error_code, updated_at=naive_utc(v.changed_at))

    def persist(self, items: list[Persist]) -> None:
        """Store bays' views (bay row, coalesced wash.status) and their sessions in one transaction."""
        with write_tx(self.db):
            for bay_id, name, view, sessions in items:
                self._persist_bay(bay_id, name, view, sessions)

    def _persist_bay(self, bay_id: str, name: str, v: View, sessions: list[OpenSession | CloseSession]) -> None:
        site = self.site_id
        for s in sessions:
            if isinstance(s, OpenSession):
                local_day, seq = v.session_id.split("-")[0], int(v.session_id.rsplit("-", 1)[1])  # type: ignore[union-attr]
                WashSession.create(session_id=v.session_id, bay=bay_id, local_day=local_day, seq=seq,
                                   course=s.course, state="STARTING", request_id=s.request_id,
                                   start_time=naive_utc(s.at))
            else:
                row = (WashSession.select().where((WashSession.bay == bay_id) & WashSession.end_time.is_null())
                       .order_by(WashSession.id.desc()).first())
                if row is None:
                    continue
                row.state, row.error_code, row.end_time = s.state, s.error_code, naive_utc(s.at)
                row.course = row.course or v.course
                row.save()
                add_event("wash.session", {
                    "sessionId": row.session_id, "bayId": bay_id, "course": row.course, "state": row.state,
                    "errorCode": row.error_code, "requestId": row.request_id,
                    "startTime": iso_z(row.start_time), "endTime": iso_z(row.end_time)},
                    site_id=site, partition=f"bay:{bay_id}")
        values = {"name": name, "state": v.state, "progress": v.progress, "course": v.course,
                  "error_code": v.error_code, "session_id": v.session_id, "request_id": v.request_id,
                  "plc_session_counter": v.plc_session, "updated_at": naive_utc(v.changed_at)}
        # An upsert, not REPLACE: REPLACE deletes the row, which sessions reference.
        Bay.insert(bay_id=bay_id, **values).on_conflict(conflict_target=[Bay.bay_id], update=values).execute()
        add_event("wash.status", {"bayId": bay_id, "state": v.state, "course": v.course, "errorCode": v.error_code,
                                  "sessionId": v.session_id, "timestampUtc": iso_z(naive_utc(v.changed_at))},
                  site_id=site, partition=f"bay:{bay_id}", coalesce_key=f"wash.status:{bay_id}")

    def persist_resets(self, bay_id: str, resets: list[ResetDone]) -> None:
        """Each reset's record and its `wash.reset` event for the cloud, in one transaction."""
        with write_tx(self.db):
            for r in resets:
                BayReset.create(bay=bay_id, request_id=r.request_id, requested_by=r.by, error_code=r.error_code,
                                outcome=r.outcome, requested_at=naive_utc(r.requested_at), done_at=naive_utc(r.at))
                add_event("wash.reset", {"bayId": bay_id, "requestId": r.request_id, "by": r.by,
                                         "errorCode": r.error_code, "outcome": r.outcome,
                                         "requestedAt": iso_z(naive_utc(r.requested_at)),
                                         "doneAt": iso_z(naive_utc(r.at))},
                          site_id=self.site_id, partition=f"bay:{bay_id}")
        for r in resets:
            log.info("%s: reset by %s (%s): %s", bay_id, r.by, r.error_code, r.outcome, extra={"bay_id": bay_id})
