"""The embedded lease store: one SQLite file shared by every node process on a machine.

It mirrors what the etcd registry offers so that one Manager serves both: keys and values in upstream's format, a
store-wide revision, an event log that watchers follow (like etcd's watch from a revision) and that is trimmed (like
compaction, after which a watcher re-lists), and TTL expiry that turns into removal events. WAL mode lets readers poll
while a writer commits; BEGIN IMMEDIATE makes create-if-absent atomic between processes.

Writers queue on an flock of `<file>-lock` before their transaction: SQLite's own wait for a busy write lock sleeps in
growing steps (up to 100 ms) rather than waking when the lock is free, and with hundreds of nodes writing at once
those sleeps, not the writes, made up most of a cluster's start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator

from ...defaults import LEASE_FILE as DEFAULT_LEASE_FILE
from ..lease import (
    Events,
    IPv4Net,
    IPv6Net,
    Lease,
    LeaseAdded,
    LeaseAttrs,
    LeaseEvent,
    Snapshot,
    decode_or_warn,
    make_subnet_key,
)
from ..registry import Registry, StoreError, SubnetExists

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # watchers see a change within this, well inside the 1 s promise
EVENTS_KEPT = 10000  # older events are trimmed; a watcher further behind re-lists
READ_WAIT = 0.05  # seconds a watch's poll waits on a busy database before trying again at the next poll
CREATE_RACE_SECONDS = 10.0  # how long nodes creating the file together retry its switch to WAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires);  -- every poll of every watcher asks for expired leases
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, value TEXT, expires REAL);
"""


class LocalRegistry(Registry):
    def __init__(self, path: str = DEFAULT_LEASE_FILE, poll_interval: float = POLL_INTERVAL) -> None:
        self.path = path
        self.poll_interval = poll_interval
        # sqlite3 connections belong to one thread: all store work runs on this one, off the event loop, except the
        # watch's polls (see _poll_connection).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-store")
        self._db: sqlite3.Connection | None = None
        self._writer_lock: int | None = None  # fd of <path>-lock, opened with the database

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
        if self._writer_lock is None:
            self._writer_lock = os.open(self.path + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")  # still there for writers without the flock (older versions)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with self._writing():
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
    @contextlib.contextmanager
    def _writing(self):
        """Hold the writers' flock: the kernel wakes the next writer the moment it is released."""
        assert self._writer_lock is not None
        fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _write(self, fn):
        """Run fn(db) inside one IMMEDIATE transaction (a write lock across processes)."""
        db = self._connection()
        with self._writing():
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

    @staticmethod
    def _anything_expired(db: sqlite3.Connection, now: float) -> bool:
        query = "SELECT 1 FROM leases WHERE expires IS NOT NULL AND expires <= ? LIMIT 1"
        return db.execute(query, (now,)).fetchone() is not None

    def _reap_expired(self, now: float) -> None:
        """Expired leases become deletions with an event, whichever process notices first."""
        if not self._anything_expired(self._connection(), now):
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
        added = (decode_or_warn(key, value, expires, True) for key, value, expires in rows)
        return Snapshot([event.lease for event in added if isinstance(event, LeaseAdded)], revision)

    @staticmethod
    def _events_since(db: sqlite3.Connection, revision: int) -> Events | None:
        """Events after `revision`; None when the log was trimmed past it (the watcher must re-list). One read
        transaction, as _snapshot's: a trim committed between the two reads would otherwise skip events unseen."""
        db.execute("BEGIN")
        try:
            oldest = db.execute("SELECT MIN(rev) FROM events").fetchone()[0]
            if oldest is not None and oldest > revision + 1:
                return None
            rows = db.execute(
                "SELECT rev, key, value, expires FROM events WHERE rev > ? ORDER BY rev", (revision,)
            ).fetchall()
        finally:
            db.execute("COMMIT")
        events: list[LeaseEvent] = []
        for rev, key, value, expires in rows:
            revision = rev
            event = decode_or_warn(key, value, expires, True)
            if event is not None:
                events.append(event)
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
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None

    # -- Registry ------------------------------------------------------------------------------------------------
    async def get_subnets(self, expirations: bool = True) -> tuple[list[Lease], int]:
        snapshot = await self._run(self._snapshot)  # the expirations are in the rows: always exact here
        return snapshot.leases, snapshot.revision

    async def create_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float
    ) -> float:
        expires = time.time() + ttl
        await self._run(self._create, make_subnet_key(subnet, ipv6_subnet), attrs.to_json(), expires)
        return expires

    async def update_subnet(
        self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None, attrs: LeaseAttrs, ttl: float | None
    ) -> float | None:
        expires = None if ttl is None else time.time() + ttl
        await self._run(self._put, make_subnet_key(subnet, ipv6_subnet), attrs.to_json(), expires)
        return expires

    async def delete_subnet(self, subnet: IPv4Net | None, ipv6_subnet: IPv6Net | None) -> None:
        await self._run(self._delete, make_subnet_key(subnet, ipv6_subnet))

    def _poll_connection(self) -> sqlite3.Connection:
        """A read-only connection for the watch's polls, used on the event loop itself.

        A poll is two indexed reads (~30 µs); handing it to the store thread cost ~250 µs of CPU per poll in thread
        wake-ups and GIL hand-offs, and 1,000 nodes polling 5 times a second spent a core on that alone. In WAL mode a
        reader never waits for a writer, and a rare busy moment (a checkpoint) is given up after READ_WAIT and tried at
        the next poll rather than holding the loop."""
        try:
            db = sqlite3.connect(self.path, timeout=READ_WAIT, isolation_level=None)
            db.execute("PRAGMA query_only=1")
        except sqlite3.Error as e:
            raise StoreError(f"lease file {self.path}: {e}") from None
        return db

    def _poll(self, db: sqlite3.Connection, revision: int) -> tuple[bool, Events | None]:
        """(whether a lease expired, the events after `revision`), read on the caller's thread."""
        try:
            return self._anything_expired(db, time.time()), self._events_since(db, revision)
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                return False, Events([], revision)  # nothing new for now
            raise StoreError(f"lease file {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise StoreError(f"lease file {self.path}: {e}") from None

    async def watch_subnets(self) -> AsyncIterator[Snapshot | Events]:
        snapshot = await self._run(self._snapshot)
        yield snapshot
        revision = snapshot.revision
        db = self._poll_connection()
        try:
            while True:
                await asyncio.sleep(self.poll_interval)
                expired, result = self._poll(db, revision)
                if expired:  # a write: on the store thread; its removal events are read at once
                    await self._run(self._reap_expired, time.time())
                    expired, result = self._poll(db, revision)
                if result is None:
                    log.info("Lease watch fell behind the trimmed event log, re-listing")
                    snapshot = await self._run(self._snapshot)
                    revision = snapshot.revision
                    yield snapshot
                    continue
                revision = result.revision
                if result.events:
                    yield result
        finally:
            db.close()

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)
