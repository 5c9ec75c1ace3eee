"""The audit chain's head, kept where a writer to the console's database cannot rewrite it.

The hash chain (``audit_chain``) names any row altered, slipped in or removed between two
others, but not rows removed from its end, nor a table emptied: what is left is still a valid
chain. So after each append commits, the chain's newest id and hash are written to a small file
outside the database (``AUDIT_WITNESS_PATH``), signed with AUDIT_CHAIN_KEY (a database writer
can neither forge nor replay it onto another chain), and ``ops audit-verify`` checks that the
witnessed event is still there with the same hash.

The witness only moves forward: writers take a lock on the file's companion ``.lock`` and keep
the higher id (on_commit callbacks of concurrent processes may run in any order; ids follow
the chain's order because the chain's lock is held from before the insert to the commit). It
moves past its event only along the chain: if the new events do not link to the witnessed one
and that one is gone or changed, the tail was cut, and the witness keeps the evidence instead.

What it cannot do: see appends it was not told of (a console host with its own
AUDIT_WITNESS_PATH only pins the events its own processes wrote; share the path between hosts
to pin every one), or resist someone who can write the file *and* holds AUDIT_CHAIN_KEY (the
console host's own operator). Events committed in the instant between a commit and its
witness write are not yet pinned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

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
    """The witnessed head, None if there is no witness yet; WitnessDamaged if forged."""
    path = path or witness_path()
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


def advance(model, *, last_id: int, last_hash: str, linked_to: str) -> None:
    """Move the witness to the event (``last_id``, ``last_hash``) just committed, whose chain
    begins at an event with hash ``linked_to``. Never backwards; never past a cut tail."""
    path = witness_path()
    with _locked(path):
        try:
            current = read(path)
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


def start(model) -> Witnessed:
    """The witness at the chain's current head, where there is none yet (an upgraded
    console's first ``ops audit-verify --start-witness``, after the chain verified)."""
    path = witness_path()
    with _locked(path):
        current = read(path)
        if current is not None:
            return current
        last = model._base_manager.order_by("-id").values_list("id", "hash").first()
        if last is not None:
            _write(path, *last)
        return read(path) or Witnessed(last_id=0, hash="", written_at="")


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
