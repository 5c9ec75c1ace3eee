"""The audit chain's head, kept where a writer to the console's database cannot rewrite it.

The hash chain (``audit_chain``) names any row altered, slipped in or removed between two
others, but not rows removed from its end, nor a table emptied: what is left is still a valid
chain. So after each append commits, the chain's newest id and hash are written to a small file
outside the database (``AUDIT_WITNESS_PATH``), signed with AUDIT_CHAIN_KEY (a database writer
can neither forge nor replay it onto another chain), and ``ops audit-verify`` checks that the
witnessed event is still there with the same hash.

The witness only moves forward: writers take a lock on the file's companion ``.lock`` and keep
the higher id (commits of concurrent processes may be witnessed in any order; ids follow
the chain's order because the chain's lock is held from before the insert to the commit). It
moves past its event only along the chain: if the new events do not link to the witnessed one
and that one is gone or changed, the tail was cut, and the witness keeps the evidence instead.

Each process writes its witness from a thread of its own (``committed``), so a request never
waits for the file's lock and its fsync; a burst of appends is one write. Readers of the
witness, and the process on its way out, wait for what it committed (``settle``).

What it cannot do: see appends it was not told of (a console host with its own
AUDIT_WITNESS_PATH only pins the events its own processes wrote; share the path between hosts
to pin every one), or resist someone who can write the file *and* holds AUDIT_CHAIN_KEY (the
console host's own operator). Events committed in the instant between a commit and its
witness write (milliseconds; a process killed then loses that write) are not yet pinned.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from django.conf import settings
from django.db import connections

from migrations_ops.audit_chain import ChainProblem, chain_key

logger = logging.getLogger(__name__)


class WitnessDamaged(Exception):
    """The witness file is unreadable or its signature does not match its content."""


@dataclass(frozen=True)
class Witnessed:
    last_id: int
    hash: str
    written_at: str


def witness_path() -> Path:
    return Path(settings.AUDIT_WITNESS_PATH)


def _signature(last_id: int, last_hash: str, written_at: str) -> str:
    text = json.dumps(["opsconsole audit witness", last_id, last_hash, written_at])
    return hmac.new(chain_key(), text.encode(), hashlib.sha256).hexdigest()


def read(path: Path | None = None) -> Witnessed | None:
    """The witnessed head, None if there is no witness yet; WitnessDamaged if forged. What
    this process committed is written first (``settle``)."""
    settle()
    return _read(path or witness_path())


def _read(path: Path) -> Witnessed | None:
    try:
        document = json.loads(path.read_text())
        witnessed = Witnessed(
            last_id=int(document["last_id"]),
            hash=str(document["hash"]),
            written_at=str(document["written_at"]),
        )
        signature = str(document["signature"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WitnessDamaged(f"the audit witness {path} cannot be read: {error}") from None
    expected = _signature(witnessed.last_id, witnessed.hash, witnessed.written_at)
    if not hmac.compare_digest(signature, expected):
        raise WitnessDamaged(
            f"the audit witness {path} was altered: its signature does not match its content"
        )
    return witnessed


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between every process writing ``path`` on this host (or sharing it
    over a file system with working POSIX locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, last_id: int, last_hash: str) -> None:
    """Atomically: a reader sees the old witness or the new one, never half of one."""
    written_at = dt.datetime.now(dt.UTC).isoformat()
    document = {
        "last_id": last_id,
        "hash": last_hash,
        "written_at": written_at,
        "signature": _signature(last_id, last_hash, written_at),
    }
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def advance(
    model, *, last_id: int, last_hash: str, linked_to: str, path: Path | None = None
) -> None:
    """Move the witness to the event (``last_id``, ``last_hash``) just committed, whose chain
    begins at an event with hash ``linked_to``. Never backwards; never past a cut tail."""
    path = path or witness_path()
    with _locked(path):
        try:
            current = _read(path)
        except WitnessDamaged as damaged:
            # Kept as it is for the auditor: ops audit-verify reports it.
            logger.error("%s: not moved to audit event #%s", damaged, last_id)
            return
        if current is not None and last_id <= current.last_id:
            return
        if current is not None and linked_to != current.hash:
            # Others appended in between (other processes): the witnessed event must still be
            # there, unchanged, for the chain to pass through it.
            found = model._base_manager.filter(pk=current.last_id).values_list("hash", flat=True)
            if list(found) != [current.hash]:
                logger.error(
                    "audit event #%s, the last one witnessed, is gone or changed: the witness "
                    "stays at it (ops audit-verify reports it)",
                    current.last_id,
                )
                return
        _write(path, last_id, last_hash)


def committed(model, *, last_id: int, last_hash: str, linked_to: str) -> None:
    """An append committed (``transaction.on_commit``): the witness moves to it soon after, in
    this process's writer thread, so that no request waits for the file's lock and its fsync."""
    _writer().submit(
        _Advance(model, witness_path(), last_id, last_hash, first_id=last_id, linked_to=linked_to)
    )


def settle(timeout: float = 10) -> bool:
    """Wait until this process's committed appends are witnessed (False if ``timeout`` passed
    first). Readers of the witness call it; so does the process on its way out."""
    writer = _current_writer
    return writer is None or writer.pid != os.getpid() or writer.settle(timeout)


@dataclass(frozen=True)
class _Advance:
    """The newest committed event to witness, and what the oldest not yet witnessed links to."""

    model: type
    path: Path
    last_id: int
    last_hash: str
    first_id: int
    linked_to: str

    def merged(self, newer: _Advance) -> _Advance:
        """One write for two appends: the newest event, linked from the oldest."""
        last = newer if newer.last_id > self.last_id else self
        first = newer if newer.first_id < self.first_id else self
        return replace(last, first_id=first.first_id, linked_to=first.linked_to)


# How long the writer lets appends gather before one write covers them all: under load, at
# most one fsync per this many seconds, instead of one per commit.
GATHER_SECONDS = 0.05


class _Writer:
    """Process state: the thread that writes the witness, and what waits for it (per witness
    file). Appends committed while it writes are merged into the next write: only the newest
    event matters, as long as the oldest links to the one witnessed. A forked child (a Celery
    pool process) starts a writer of its own."""

    def __init__(self):
        self.pid = os.getpid()
        self._condition = threading.Condition()
        self._pending: dict[Path, _Advance] = {}
        self._writing = False
        self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
        self._thread.start()

    def submit(self, job: _Advance) -> None:
        with self._condition:
            queued = self._pending.get(job.path)
            self._pending[job.path] = queued.merged(job) if queued else job
            self._condition.notify_all()

    def settle(self, timeout: float) -> bool:
        if threading.current_thread() is self._thread:
            return True
        with self._condition:
            return self._condition.wait_for(
                lambda: not self._pending and not self._writing, timeout
            )

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending)
            time.sleep(GATHER_SECONDS)
            with self._condition:
                _, job = self._pending.popitem()
                self._writing = True
            try:
                advance(
                    job.model,
                    last_id=job.last_id,
                    last_hash=job.last_hash,
                    linked_to=job.linked_to,
                    path=job.path,
                )
            except Exception:
                logger.exception("the audit witness could not be moved to event #%s", job.last_id)
            finally:
                # The check of the witnessed event opened this thread's own connection.
                connections.close_all()
                with self._condition:
                    self._writing = False
                    self._condition.notify_all()


_current_writer: _Writer | None = None
_writer_lock = threading.Lock()


def _writer() -> _Writer:
    global _current_writer
    writer = _current_writer
    if writer is not None and writer.pid == os.getpid():
        return writer
    with _writer_lock:
        if _current_writer is None or _current_writer.pid != os.getpid():
            _current_writer = _Writer()
        return _current_writer


atexit.register(settle)


def start(model) -> Witnessed:
    """The witness at the chain's current head, where there is none yet (an upgraded
    console's first ``ops audit-verify --start-witness``, after the chain verified)."""
    path = witness_path()
    settle()
    with _locked(path):
        current = _read(path)
        if current is not None:
            return current
        last = model._base_manager.order_by("-id").values_list("id", "hash").first()
        if last is not None:
            _write(path, *last)
        return _read(path) or Witnessed(last_id=0, hash="", written_at="")


def check(model, *, count: int, last_id: int | None) -> list[ChainProblem]:
    """What the witness says of the chain just walked (``count`` events, the last ``last_id``)."""
    path = witness_path()
    try:
        witnessed = read(path)
    except WitnessDamaged as damaged:
        return [ChainProblem(0, "witness damaged", str(damaged))]
    if witnessed is None:
        if count == 0:
            return []
        return [
            ChainProblem(
                0,
                "unwitnessed",
                f"no audit witness at {path}: whether the newest events were removed cannot be "
                "told (a console upgraded to the witness: run ops audit-verify --start-witness "
                "once)",
            )
        ]
    seen = f"(witnessed {witnessed.written_at} in {path})"
    if count == 0:
        return [
            ChainProblem(
                witnessed.last_id,
                "removed",
                f"the audit trail was emptied: it is empty, but event #{witnessed.last_id} "
                f"was written {seen}",
            )
        ]
    found = list(model._base_manager.filter(pk=witnessed.last_id).values_list("hash", flat=True))
    if found == [witnessed.hash]:
        return []
    if found:
        message = f"audit event #{witnessed.last_id} was rewritten: its hash is not the one {seen}"
    elif last_id < witnessed.last_id:
        message = (
            f"the newest audit events were removed: the trail ends at #{last_id}, but event "
            f"#{witnessed.last_id} was written {seen}"
        )
    else:
        message = f"audit event #{witnessed.last_id} was removed {seen}"
    return [ChainProblem(witnessed.last_id, "removed", message)]
