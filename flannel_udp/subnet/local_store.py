"""The embedded lease store: one SQLite file shared by every node process on a machine.

It mirrors what the etcd registry offers so that one Manager serves both: keys and values in upstream's format, a
store-wide revision, an event log that watchers follow (like etcd's watch from a revision) and that is trimmed (like
compaction, after which a watcher re-lists), and TTL expiry that turns into removal events. WAL mode lets readers poll
while a writer commits; BEGIN IMMEDIATE makes create-if-absent atomic between processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator

from ..defaults import LEASE_FILE as DEFAULT_LEASE_FILE
from .lease import (
    Events,
    IPv4Net,
    IPv6Net,
    Lease,
    LeaseAdded,
    LeaseAttrs,
    LeaseError,
    LeaseEvent,
    LeaseRemoved,
    Snapshot,
    lease_from_kv,
    make_subnet_key,
    parse_subnet_key,
)
from .registry import Registry, StoreError, SubnetExists

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # watchers see a change within this, well inside the 1 s promise
EVENTS_KEPT = 10000
CREATE_RACE_SECONDS = 10.0  # older events are trimmed; a watcher further behind re-lists

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires);  -- every poll of every watcher asks for expired leases
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, value TEXT, expires REAL);
"""


class LocalRegistry(Registry):
    def __init__(self, path: str = DEFAULT_LEASE_FILE, poll_interval: float = POLL_INTERVAL) -> None:
        self.path = path
        self.poll_interval = poll_interval
        # sqlite3 connections belong to one thread: all store work runs on this one, off the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    def open_sync(cls, path: str = DEFAULT_LEASE_FILE, poll_interval: float = POLL_INTERVAL) -> LocalRegistry:
        """Open (and create) the file now, so that a bad path fails at start-up with a clear StoreError."""
        registry = cls(path, poll_interval)
        registry._executor.submit(registry._connect).result()
        return registry

    def _connection(self) -> sqlite3.Connection:
        """The store thread's connection, opened on first use."""
        if self._db is None:
            self._connect()
        assert self._db is not None
        return self._db

    def _connect(self) -> None:
        # Nodes that start together may race to create the file: switching it to WAL can answer "database is locked"
        # at once, without waiting on the busy timeout, so that step is tried again for a while.
        deadline = time.monotonic() + CREATE_RACE_SECONDS
        while True:
            try:
                self._db = self._open()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise StoreError(f"cannot use lease file {self.path}: {e}") from None
                time.sleep(0.05)
            except (OSError, sqlite3.Error) as e:
                raise StoreError(f"cannot use lease file {self.path}: {e}") from None

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise StoreError(f"lease file {self.path}: {e}") from None

    # -- synchronous bodies, run on the store thread -------------------------------------------------------------
    def _write(self, fn):
        """Run fn(db) inside one IMMEDIATE transaction (a write lock across processes)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _log_event(db: sqlite3.Connection, key: str, value: str | None, expires: float | None) -> None:
        db.execute("INSERT INTO events (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))

    def _reap_expired(self, now: float) -> None:
        """Expired leases become deletions with an event, whichever process notices first."""
        db = self._connection()
        if (
            db.execute("SELECT 1 FROM leases WHERE expires IS NOT NULL AND expires <= ? LIMIT 1", (now,)).fetchone()
            is None
        ):
            return

        def reap(db):
            for (key,) in db.execute(
                "SELECT key FROM leases WHERE expires IS NOT NULL AND expires <= ?", (now,)
            ).fetchall():
                db.execute("DELETE FROM leases WHERE key = ?", (key,))
                self._log_event(db, key, None, None)

        self._write(reap)

    def _revision(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return row[0] if row else 0

    def _snapshot(self) -> Snapshot:
        self._reap_expired(time.time())
        db = self._connection()
        db.execute("BEGIN")  # one read transaction: the rows and the revision agree
        try:
            rows = db.execute("SELECT key, value, expires FROM leases ORDER BY key").fetchall()
            revision = self._revision(db)
        finally:
            db.execute("COMMIT")
        leases = []
        for key, value, expires in rows:
            try:
                leases.append(lease_from_kv(key, value, expires))
            except LeaseError as e:
                log.warning("Ignoring bad subnet node %s: %s", key, e)
        return Snapshot(leases, revision)

    def _events_since(self, revision: int) -> Events | None:
        """Events after `revision`; None when the log was trimmed past it (the watcher must re-list)."""
        self._reap_expired(time.time())
        db = self._connection()
        oldest = db.execute("SELECT MIN(rev) FROM events").fetchone()[0]
        if oldest is not None and oldest > revision + 1:
            return None
        rows = db.execute(
            "SELECT rev, key, value, expires FROM events WHERE rev > ? ORDER BY rev", (revision,)
        ).fetchall()
        events: list[LeaseEvent] = []
        for rev, key, value, expires in rows:
            revision = rev
            try:
                if value is None:
                    subnets = parse_subnet_key(key)
                    if subnets is None:
                        raise LeaseError(f"bad subnet key {key!r}")
                    events.append(LeaseRemoved(*subnets))
                else:
                    events.append(LeaseAdded(lease_from_kv(key, value, expires)))
            except LeaseError as e:
                log.warning("Ignoring bad subnet node %s: %s", key, e)
        return Events(events, revision)

    def _create(self, key: str, value: str, expires: float) -> None:
        def create(db):
            if db.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
                raise SubnetExists(f"subnet {key} already exists")
            db.execute("INSERT INTO leases (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))
            self._log_event(db, key, value, expires)
            self._trim(db)

        self._write(create)

    def _put(self, key: str, value: str, expires: float | None) -> None:
        def put(db):
            db.execute("INSERT OR REPLACE INTO leases (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))
            self._log_event(db, key, value, expires)
            self._trim(db)

        self._write(put)

    def _delete(self, key: str) -> None:
        def delete(db):
            if db.execute("DELETE FROM leases WHERE key = ?", (key,)).rowcount:
                self._log_event(db, key, None, None)

        self._write(delete)

    def _trim(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM events WHERE rev <= ?", (self._revision(db) - EVENTS_KEPT,))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- Registry ------------------------------------------------------------------------------------------------
    async def get_subnets(self, expirations: bool = True) -> tuple[list[Lease], int]:
        snapshot = await self._run(self._snapshot)  # the expirations are in the rows: always exact here
        return snapshot.leases, snapshot.revision

    async def create_subnet(self, subnet: IPv4Net, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float) -> float:
        expires = time.time() + ttl
        await self._run(self._create, make_subnet_key(subnet, ipv6_subnet), attrs.to_json(), expires)
        return expires

    async def update_subnet(
        self, subnet: IPv4Net, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float | None
    ) -> float | None:
        expires = None if ttl is None else time.time() + ttl
        await self._run(self._put, make_subnet_key(subnet, ipv6_subnet), attrs.to_json(), expires)
        return expires

    async def put_raw(self, key: str, value: str, ttl: float | None) -> None:
        """Write any key/value as given (operators' reservations, and tests of hostile store content)."""
        await self._run(self._put, key, value, None if ttl is None else time.time() + ttl)

    async def delete_subnet(self, subnet: IPv4Net, ipv6_subnet: IPv6Net | None) -> None:
        await self._run(self._delete, make_subnet_key(subnet, ipv6_subnet))

    async def watch_subnets(self) -> AsyncIterator[Snapshot | Events]:
        snapshot = await self._run(self._snapshot)
        yield snapshot
        revision = snapshot.revision
        while True:
            await asyncio.sleep(self.poll_interval)
            result = await self._run(self._events_since, revision)
            if result is None:
                log.info("Lease watch fell behind the trimmed event log, re-listing")
                snapshot = await self._run(self._snapshot)
                revision = snapshot.revision
                yield snapshot
                continue
            revision = result.revision
            if result.events:
                yield result

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)
