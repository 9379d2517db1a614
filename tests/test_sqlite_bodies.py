"""Large message bodies kept as files beside the SQLite spool (``BODY_FILE_MIN``).

The spool's contract with files for every body runs in ``tests/spool`` (the
``sqlite-files`` backend); here: where the bytes are, when a file goes, and what a
crash or a failed write leaves behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

import pytest

from esprelay.errors import SpoolError, SpoolFull
from esprelay.models import Envelope, MessageState
from esprelay.spill import Spilled, Spiller
from esprelay.spool import sqlite as sqlite_spool
from esprelay.spool.base import NewPart
from esprelay.spool.sqlite import BODY_FILE_MIN, BODY_MISSING, SqliteSpool

ENVELOPE = Envelope("a@example.com", ("b@example.org",))
LARGE = b"Subject: large\r\n\r\n" + (b"x" * 76 + b"\r\n") * (BODY_FILE_MIN // 78 + 1)
SMALL = b"Subject: small\r\n\r\nbody\r\n"


def bodies(path: Path) -> list[str]:
    return sorted(os.listdir(path.with_name(path.name + ".bodies")))


def row(path: Path, id: str) -> tuple[object, ...]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found = conn.execute("SELECT raw, body_file FROM messages WHERE id = ?", (id,)).fetchone()
    assert found is not None
    return tuple(found)


@pytest.fixture
async def spool(tmp_path: Path) -> SqliteSpool:
    spool = SqliteSpool(tmp_path / "s.db", exclusive=True)
    await spool.open()
    yield spool  # type: ignore[misc]
    await spool.close()


async def test_a_large_body_is_a_file_and_goes_once_delivered(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    path = tmp_path / "s.db"
    large = await spool.put(ENVELOPE, LARGE, provider="p")
    small = await spool.put(ENVELOPE, SMALL, provider="p")
    assert bodies(path) == [large]
    assert (path.with_name("s.db.bodies") / large).read_bytes() == LARGE
    assert row(path, large) == (None, 1)
    assert row(path, small) == (SMALL, 0)
    got = await spool.get(large, with_body=True)
    assert got is not None and got.raw == LARGE and got.size == len(LARGE)

    leased = {m.id: m for m in await spool.lease("w", 10, 60)}
    assert leased[large].raw == LARGE
    assert leased[small].raw == SMALL
    assert await spool.mark_delivered(large, owner="w", provider="p", provider_message_id="x")
    assert bodies(path) == []
    assert row(path, large) == (None, 0)
    delivered = await spool.get(large)
    assert delivered is not None and delivered.state is MessageState.DELIVERED


async def test_a_body_spooled_leased_goes_at_its_delivery(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    [id] = await spool.put_parts(LARGE, [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60)
    assert bodies(tmp_path / "s.db") == [id]
    assert await spool.mark_delivered(id, owner="w", provider="p", provider_message_id=None)
    assert bodies(tmp_path / "s.db") == []


async def test_a_split_message_gets_a_file_per_entry(spool: SqliteSpool, tmp_path: Path) -> None:
    ids = await spool.put_parts(LARGE, [NewPart(ENVELOPE, "p"), NewPart(ENVELOPE, "q")])
    assert bodies(tmp_path / "s.db") == sorted(ids)
    leased = await spool.lease("w", 10, 60)
    assert [m.raw for m in leased] == [LARGE, LARGE]
    await spool.mark_delivered(ids[0], owner="w", provider="p", provider_message_id=None)
    assert bodies(tmp_path / "s.db") == [ids[1]]


async def test_a_failed_message_keeps_its_file_for_a_retry_until_deleted(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    id = await spool.put(ENVELOPE, LARGE, provider="p")
    await spool.lease("w", 10, 60)
    await spool.mark_failed(id, owner="w", provider="p", error="550 no")
    assert bodies(tmp_path / "s.db") == [id]
    assert await spool.retry_now(id)
    [again] = await spool.lease("w2", 10, 60)
    assert again.raw == LARGE
    await spool.mark_retry(id, owner="w2", provider="p", error="451 later", next_attempt_at=0)
    assert await spool.delete(id)
    assert bodies(tmp_path / "s.db") == []


async def test_purge_removes_the_files_of_the_rows_it_removes(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    failed = await spool.put(ENVELOPE, LARGE, provider="p")
    kept = await spool.put(ENVELOPE, LARGE, provider="p")
    await spool.lease("w", 1, 60)  # the older one
    await spool.mark_failed(failed, owner="w", provider="p", error="550 no")
    assert await spool.purge(delivered_before=0, failed_before=float("inf")) == 1
    assert bodies(tmp_path / "s.db") == [kept]


async def test_files_no_row_names_go_at_the_next_exclusive_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = SqliteSpool(path, exclusive=True)
    await spool.open()
    named = await spool.put(ENVELOPE, LARGE, provider="p")
    await spool.close()
    folder = path.with_name("s.db.bodies")
    (folder / "1a2b3c-written-never-committed").write_bytes(LARGE)
    # esprelay queue opens the file without the lock: it leaves files alone.
    viewer = SqliteSpool(path)
    await viewer.open()
    await viewer.close()
    assert len(bodies(path)) == 2

    spool = SqliteSpool(path, exclusive=True)
    await spool.open()
    assert bodies(path) == [named]
    [message] = await spool.lease("w", 10, 60)
    assert message.raw == LARGE
    await spool.close()


async def test_a_message_whose_file_is_gone_fails_and_the_others_go_on(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    lost = await spool.put(ENVELOPE, LARGE, provider="p")
    fine = await spool.put(ENVELOPE, LARGE, provider="p")
    os.unlink(tmp_path / "s.db.bodies" / lost)
    leased = await spool.lease("w", 10, 60)
    assert [m.id for m in leased] == [fine]
    failed = await spool.get(lost)
    assert failed is not None
    assert failed.state is MessageState.FAILED
    assert failed.last_error == BODY_MISSING
    assert await spool.lease("w", 10, 60) == []


async def test_a_put_whose_rows_are_not_committed_leaves_no_file(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as conn, conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.size > 100000"
            " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
        )
    with pytest.raises(SpoolError, match="refused for the test"):
        await spool.put(ENVELOPE, LARGE, provider="p")
    assert bodies(tmp_path / "s.db") == []
    assert await spool.put(ENVELOPE, SMALL, provider="p")


@pytest.mark.parametrize(
    ("code", "error"), [(errno.ENOSPC, SpoolFull), (errno.EIO, SpoolError)], ids=["full", "io"]
)
async def test_a_body_that_cannot_be_written_is_a_spool_error_and_leaves_nothing(
    spool: SqliteSpool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    error: type[Exception],
) -> None:
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second entry's file
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(sqlite_spool.os, "fsync", failing_fsync)
    with pytest.raises(error):
        await spool.put_parts(LARGE, [NewPart(ENVELOPE, "p"), NewPart(ENVELOPE, "q")])
    monkeypatch.undo()
    assert bodies(tmp_path / "s.db") == []
    assert (await spool.stats()).counts == {}


def _spilled(directory: Path, raw: bytes) -> Spilled:
    file = Spiller(directory).open()
    file.write([raw])
    return file.finish(raw[:100])


async def test_a_message_written_at_data_becomes_its_body_file(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """The file the engine wrote in the spool's folder is linked under each entry's id
    (the same file: no copy), on disk before the rows are committed."""
    spilled = _spilled(spool.body_directory, LARGE)
    inode = os.fstat(spilled.fd).st_ino
    ids = await spool.put_parts(spilled, [NewPart(ENVELOPE, "p"), NewPart(ENVELOPE, "q")])
    assert [os.stat(spool.body_directory / id).st_ino for id in ids] == [inode, inode]
    spilled.discard()
    assert bodies(tmp_path / "s.db") == sorted(ids)
    assert [row(tmp_path / "s.db", id) for id in ids] == [(None, 1), (None, 1)]
    leased = await spool.lease("w", 10, 60)
    assert [m.raw for m in leased] == [LARGE, LARGE]
    assert [m.size for m in leased] == [len(LARGE), len(LARGE)]
    await spool.mark_delivered(ids[0], owner="w", provider="p", provider_message_id=None)
    assert bodies(tmp_path / "s.db") == [ids[1]]


async def test_a_message_written_elsewhere_or_small_is_read_back(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    elsewhere = _spilled(tmp_path, LARGE)
    [id] = await spool.put_parts(elsewhere, [NewPart(ENVELOPE, "p")])
    assert os.stat(spool.body_directory / id).st_ino != os.fstat(elsewhere.fd).st_ino
    elsewhere.discard()
    small = _spilled(spool.body_directory, SMALL)
    [small_id] = await spool.put_parts(small, [NewPart(ENVELOPE, "p")])
    small.discard()
    assert row(tmp_path / "s.db", small_id) == (SMALL, 0)
    assert bodies(tmp_path / "s.db") == [id]


async def test_a_file_left_while_a_message_arrived_goes_at_the_next_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    spool = SqliteSpool(path, exclusive=True)
    await spool.open()
    Spiller(spool.body_directory).open().write([LARGE])  # never finished: a crash
    await spool.close()
    assert len(bodies(path)) == 1
    spool = SqliteSpool(path, exclusive=True)
    await spool.open()
    assert bodies(path) == []
    await spool.close()


async def test_a_message_written_at_data_with_its_header_repaired(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """A new head (the header repaired) and the rest of the file: a new file, written
    before the commit; the file as received is left to its owner."""
    spilled = _spilled(spool.body_directory, LARGE)
    new_head = b"Date: Sat, 05 Dec 2026 18:00:00 +0000\r\n" + spilled.head
    spilled.replace_head(new_head)
    expected = new_head + LARGE[100:]
    assert spilled.size == len(expected)
    assert spilled.read() == expected
    assert spilled.read_at(10, 200) == expected[10:210]
    assert spilled.read_at(len(new_head) - 5, 10) == expected[len(new_head) - 5 :][:10]
    [id] = await spool.put_parts(spilled, [NewPart(ENVELOPE, "p")])
    assert os.stat(spool.body_directory / id).st_ino != os.fstat(spilled.fd).st_ino
    spilled.discard()
    assert bodies(tmp_path / "s.db") == [id]
    [leased] = await spool.lease("w", 10, 60)
    assert leased.raw == expected and leased.size == len(expected)
