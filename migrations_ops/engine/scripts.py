"""Migration scripts: reading an application's migrations folder.

Three layouts are read, the ones the application's migration tools write:

* ``dbmate``: one file per migration, ``-- migrate:up`` and ``-- migrate:down`` sections, each
  optionally followed by ``transaction:false``;
* ``goose``: one file per migration, ``-- +goose Up`` / ``-- +goose Down`` sections,
  ``-- +goose StatementBegin`` / ``-- +goose StatementEnd`` around a statement that holds
  semicolons of its own, and ``-- +goose NO TRANSACTION``;
* ``paired``: ``NAME.up.sql`` with plain SQL, and optionally ``NAME.down.sql``.

Statements are split by a small scanner modelled on psql's own lexer (see ``split_statements``).
Every error is a ``ScriptError`` whose one-line message starts with ``file:line:``, and a folder
is read whole or not at all.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ScriptError

LAYOUTS = ("dbmate", "goose", "paired")
DOWN_SEPARATOR = "\n-- down --\n"
# The console's column holds 40 (MigrationScript.version); no real version comes close (a
# timestamp to the microsecond has 20).
MAX_VERSION_DIGITS = 40


@dataclass(frozen=True)
class Statement:
    sql: str  # one statement, stripped, without its terminating semicolon
    line: int  # 1-based line in the source file where it starts


@dataclass(frozen=True)
class MigrationScript:
    version: str
    name: str
    filename: str
    layout: str
    up_sql: str
    down_sql: str
    up_statements: tuple[Statement, ...]
    down_statements: tuple[Statement, ...]
    transactional: bool
    needs_no_transaction: tuple[str, ...]
    checksum: str

    @property
    def has_down_sql(self) -> bool:
        return bool(self.down_sql.strip())


# --- text ------------------------------------------------------------------------------------
_TRAILING_SPACE = " \t\f\v"


def normalise(text: str) -> str:
    """LF line ends, no trailing whitespace on a line, no leading or trailing blank line, no
    BOM. Only line breaks are "\\n" (after CRLF and CR become one), as in an editor."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return _join_trimmed([line.rstrip(_TRAILING_SPACE) for line in text.split("\n")])[0]


def _join_trimmed(lines: list[str]) -> tuple[str, int]:
    """Lines without leading and trailing blank ones, joined; and how many leading were cut.
    A BOM (U+FEFF) starting the first kept line goes too, so the result is a fixed point."""
    lines = list(lines)
    start, end = 0, len(lines)
    while True:
        while start < end and not lines[start]:
            start += 1
        if start == end or not lines[start].startswith("\ufeff"):
            break
        lines[start] = lines[start].lstrip("\ufeff")
    while end > start and not lines[end - 1]:
        end -= 1
    return "\n".join(lines[start:end]), start


def checksum_of(up_sql: str, down_sql: str) -> str:
    text = normalise(up_sql) + DOWN_SEPARATOR + normalise(down_sql)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _shown(text: str, limit: int = 80) -> str:
    """Text fit for a one-line message: unprintable characters (line breaks of any kind,
    undecodable file-name bytes) escaped, and cut to ``limit`` characters."""
    text = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(display: str, line: int, message: str) -> ScriptError:
    return ScriptError(f"{display}:{line}: {message}")


# --- the scanner -----------------------------------------------------------------------------
# Token kinds: ws, comment, string, ident (quoted identifier), word, semi, open, close, other.
_WS = re.compile(r"[ \t\n\r\f\v]+")
_IDENT_START = "A-Za-z_\x80-\U0010ffff"
_WORD = re.compile(rf"[{_IDENT_START}][{_IDENT_START}0-9$]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_DOLLAR_TAG = re.compile(rf"\$(?:[{_IDENT_START}][{_IDENT_START}0-9]*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_E_STRING_STOP = re.compile(r"[\\']")


def _quoted_end(text: str, start: int, quote: str) -> int:
    """End of a literal opened at ``start``. A doubled quote inside (``'it''s'``) reads as two
    adjacent literals, which splits the same, so it needs no handling of its own."""
    found = text.find(quote, start + 1)
    return len(text) if found == -1 else found + 1


def _e_string_end(text: str, start: int) -> int:
    """End of an ``E'...'`` string (``start`` at its quote): backslash escapes too."""
    position = start + 1
    while True:
        match = _E_STRING_STOP.search(text, position)
        if match is None:
            return len(text)
        if match.group() == "\\" or text.startswith("'", match.end()):
            position = match.end() + 1  # past an escaped character or a doubled quote
        else:
            return match.end()


def _block_comment_end(text: str, start: int) -> int:
    """End of a ``/* */`` comment; they nest in PostgreSQL."""
    depth = 0
    for match in _COMMENT_EDGE.finditer(text, start):
        depth += 1 if match.group() == "/*" else -1
        if depth == 0:
            return match.end()
    return len(text)


def _tokens(text: str) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) for every token; an unterminated literal or comment runs to the end."""
    position, size = 0, len(text)
    while position < size:
        char = text[position]
        start = position
        if char in " \t\n\r\f\v":
            position = _WS.match(text, position).end()  # type: ignore[union-attr]
            kind = "ws"
        elif text.startswith("--", position):
            newline = text.find("\n", position)
            position = size if newline == -1 else newline
            kind = "comment"
        elif text.startswith("/*", position):
            position = _block_comment_end(text, position)
            kind = "comment"
        elif char == "'":
            position, kind = _quoted_end(text, position, "'"), "string"
        elif char in '"`':
            position, kind = _quoted_end(text, position, char), "ident"
        elif char == "$":
            tag = _DOLLAR_TAG.match(text, position)
            if tag is not None:
                close = text.find(tag.group(), tag.end())
                position = size if close == -1 else close + len(tag.group())
                kind = "string"
            else:
                param = _PARAM.match(text, position)
                position = param.end() if param else position + 1
                kind = "other"
        elif char in ";()":
            position += 1
            kind = {";": "semi", "(": "open", ")": "close"}[char]
        else:
            word = _WORD.match(text, position)
            if word is not None:
                position = word.end()
                if word.group() in ("e", "E") and text.startswith("'", position):
                    position, kind = _e_string_end(text, position), "string"
                else:
                    kind = "word"
            else:
                number = _NUMBER.match(text, position)
                position = number.end() if number else position + 1
                kind = "other"
        yield kind, start, position


@dataclass(frozen=True)
class _Piece:
    start: int  # offset of the first token that is not whitespace or a comment
    end: int  # end of the last such token before the terminating semicolon
    code: str  # its tokens: words upper-cased, literals as "?", comments gone


def _opens_blocks(words: list[str]) -> bool:
    """``CREATE [OR REPLACE] FUNCTION|PROCEDURE`` (a ``BEGIN ATOMIC ... END`` body) and
    ``CREATE [TEMP] TRIGGER`` (SQLite's ``BEGIN ... END`` body): semicolons inside a BEGIN at
    the top level do not end the statement. This is psql's own rule, plus SQLite triggers."""
    if not words or words[0] != "CREATE":
        return False
    rest = words[1:]
    if rest[:2] == ["OR", "REPLACE"]:
        rest = rest[2:]
    elif rest[:1] in (["TEMP"], ["TEMPORARY"]):
        rest = rest[1:]
    return rest[:1] in (["FUNCTION"], ["PROCEDURE"], ["TRIGGER"])


def _pieces(text: str) -> list[_Piece]:
    pieces: list[_Piece] = []
    start: int | None = None
    end = 0
    code: list[str] = []
    words: list[str] = []
    parens = begins = 0
    for kind, token_start, token_end in _tokens(text):
        if kind in ("ws", "comment"):
            continue
        if kind == "semi" and parens == 0 and begins == 0:
            if start is not None:
                pieces.append(_Piece(start, end, " ".join(code)))
            start, code, words = None, [], []
            continue
        if start is None:
            start = token_start
        end = token_end
        value = text[token_start:token_end]
        if kind == "word":
            word = value.upper()
            code.append(word)
            if len(words) < 4:
                words.append(word)
            if parens == 0 and _opens_blocks(words):
                if word == "BEGIN" or (word == "CASE" and begins):
                    begins += 1
                elif word == "END" and begins:
                    begins -= 1
        elif kind == "open":
            parens += 1
            code.append("(")
        elif kind == "close":
            parens = max(0, parens - 1)
            code.append(")")
        elif kind in ("string", "ident"):
            code.append("?")
        else:
            code.append(value)
    if start is not None:
        pieces.append(_Piece(start, end, " ".join(code)))
    return pieces


def split_statements(sql: str, first_line: int = 1) -> tuple[Statement, ...]:
    """Split SQL (LF line ends) into statements, each with the line it starts on.

    Semicolons end a statement unless they are inside a single-quoted string (also ``E'...'``
    with backslash escapes), a double-quoted or backquoted identifier, a dollar-quoted body
    (``$$...$$``, ``$tag$...$tag$``), a ``--`` or nested ``/* */`` comment, parentheses (rule
    actions), or the ``BEGIN ... END`` body of ``CREATE FUNCTION|PROCEDURE`` (``BEGIN ATOMIC``)
    or of a SQLite ``CREATE TRIGGER``. Comments before a statement are not part of it, and a
    fragment holding only comments is dropped.
    """
    statements = []
    line, counted = first_line, 0
    for piece in _pieces(sql):
        line += sql.count("\n", counted, piece.start)
        counted = piece.start
        text = sql[piece.start : piece.end].rstrip()  # an unterminated literal ends in blanks
        if text:
            statements.append(Statement(text, line))
    return tuple(statements)


def _whole_statement(sql: str, first_line: int) -> tuple[Statement, ...]:
    """A goose StatementBegin/End block: one statement, whatever semicolons it holds."""
    pieces = _pieces(sql)
    text = sql[pieces[0].start : pieces[-1].end].rstrip() if pieces else ""
    if not text:
        return ()
    return (Statement(text, first_line + sql.count("\n", 0, pieces[0].start)),)


# --- statements that cannot run inside a transaction -----------------------------------------
_NO_TRANSACTION = [
    re.compile(pattern)
    for pattern in (
        r"^CREATE (UNIQUE )?INDEX CONCURRENTLY\b",
        r"^DROP INDEX CONCURRENTLY\b",
        r"^REINDEX\b.*\bCONCURRENTLY\b",
        r"^REINDEX (\( .*? \) )?(DATABASE|SYSTEM)\b",
        r"^VACUUM\b",
        r"^ALTER TYPE\b.*\bADD VALUE\b",  # refused in a transaction before PostgreSQL 12
        r"^(CREATE|DROP) DATABASE\b",
        r"^ALTER DATABASE\b.*\bSET TABLESPACE\b",
        r"^(CREATE|DROP) TABLESPACE\b",
        r"^ALTER SYSTEM\b",
        r"^ALTER TABLE\b.*\bDETACH PARTITION\b.*\b(CONCURRENTLY|FINALIZE)\b",
        r"^CLUSTER( VERBOSE)?$",
    )
]


def _first_line(sql: str) -> str:
    return _shown(" ".join(sql.split("\n", 1)[0].split()), 200)


def _needs_no_transaction(statements: tuple[Statement, ...]) -> list[str]:
    found = []
    for statement in statements:
        codes = [piece.code for piece in _pieces(statement.sql)]
        if any(pattern.search(code) for code in codes for pattern in _NO_TRANSACTION):
            found.append(_first_line(statement.sql))
    return found


# --- files -----------------------------------------------------------------------------------
_DBMATE_MARKER = re.compile(r"--\s*migrate:(\S*)(.*)")
_GOOSE_MARKER = re.compile(r"--\s*\+goose(?![\w$])(.*)", re.IGNORECASE)
_VERSION = re.compile(r"[0-9]+")
_SUFFIXES = (".up.sql", ".down.sql", ".sql")


@dataclass(frozen=True)
class _Marker:
    kind: str  # "dbmate" | "goose"
    keyword: str  # dbmate: as written; goose: lower case, single spaces
    rest: str  # dbmate: the options after the keyword
    line: int
    text: str


def _decode(display: str, content: bytes | str) -> list[str]:
    """The file's lines: UTF-8, BOM dropped, CRLF and CR read as LF, trailing blanks cut."""
    if isinstance(content, str):  # text already: a lone surrogate still fails below
        content = content.encode("utf-8", "surrogatepass")
    content = bytes(content)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        head = content[: error.start]
        line = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raise _fail(
            display,
            line,
            f"is not UTF-8 text (byte 0x{content[error.start]:02x}): save it as UTF-8",
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise _fail(display, line, "holds a NUL character, which no database accepts in SQL")
    return [line.rstrip(_TRAILING_SPACE) for line in text.split("\n")]


def _marker(display: str, number: int, line: str) -> _Marker | None:
    stripped = line.lstrip()
    dbmate = _DBMATE_MARKER.fullmatch(stripped)
    goose = None if dbmate else _GOOSE_MARKER.fullmatch(stripped)
    if dbmate is None and goose is None:
        return None
    if stripped != line:
        raise _fail(
            display, number, f"the marker {_shown(stripped)!r} must start at the line's start"
        )
    if dbmate is not None:
        return _Marker("dbmate", dbmate.group(1), dbmate.group(2), number, stripped)
    keyword = " ".join(goose.group(1).split()).lower()  # type: ignore[union-attr]
    return _Marker("goose", keyword, "", number, stripped)


def _markers(display: str, lines: list[str]) -> dict[int, _Marker]:
    found = {}
    for number, line in enumerate(lines, 1):
        marker = _marker(display, number, line)
        if marker is not None:
            found[number] = marker
    return found


def _no_sql_before(display: str, lines: list[str], section: str) -> None:
    """Tools skip (dbmate) or refuse (goose) SQL above the first section: never run it
    silently, say so."""
    statements = split_statements("\n".join(lines))
    if statements:
        raise _fail(
            display, statements[0].line, f"SQL before {section} (it would never run): move it"
        )


def _section(lines: list[str], first_line: int) -> tuple[str, tuple[Statement, ...]]:
    text, cut = _join_trimmed(lines)
    return text, split_statements(text, first_line + cut)


def _name_and_version(display: str, filename: str) -> tuple[str, str]:
    base = PurePosixPath(filename).name
    if not base or not all(c.isprintable() for c in base):
        raise _fail(display, 1, "the file name is empty or has unprintable characters")
    name = base
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    version = _VERSION.match(name)
    if version is None:
        raise _fail(
            display,
            1,
            "the name has no version prefix: it must start with digits, "
            "e.g. 001_create_users.sql or 20240101120000_create_users.sql",
        )
    if len(version.group()) > MAX_VERSION_DIGITS:
        raise _fail(display, 1, f"the version prefix is longer than {MAX_VERSION_DIGITS} digits")
    return name, version.group()


def _script(
    *,
    version: str,
    name: str,
    filename: str,
    layout: str,
    up: tuple[str, tuple[Statement, ...]],
    down: tuple[str, tuple[Statement, ...]],
    transactional: bool,
) -> MigrationScript:
    return MigrationScript(
        version=version,
        name=name,
        filename=filename,
        layout=layout,
        up_sql=up[0],
        down_sql=down[0],
        up_statements=up[1],
        down_statements=down[1],
        transactional=transactional,
        needs_no_transaction=tuple(_needs_no_transaction(up[1] + down[1])),
        checksum=checksum_of(up[0], down[0]),
    )


def parse_file(filename: str, content: bytes | str) -> MigrationScript:
    """One migration of a single-file layout (dbmate or goose), told apart by its markers.
    ``filename`` is shown in errors as given; the script keeps its last path component."""
    return _parse_single(_shown(filename, 200), filename, content)


def _parse_single(display: str, filename: str, content: bytes | str) -> MigrationScript:
    name, version = _name_and_version(display, filename)
    lines = _decode(display, content)
    markers = _markers(display, lines)
    if not markers:
        raise _fail(display, 1, "no -- migrate:up or -- +goose Up section")
    first = next(iter(markers.values()))
    for marker in markers.values():
        if marker.kind != first.kind:
            raise _fail(
                display,
                marker.line,
                f"{_shown(marker.text)!r} mixes goose and dbmate markers "
                f"(line {first.line} has {_shown(first.text)!r})",
            )
    parse = _parse_dbmate if first.kind == "dbmate" else _parse_goose
    up, down, transactional = parse(display, lines, markers)
    return _script(
        version=version,
        name=name,
        filename=PurePosixPath(filename).name,
        layout=first.kind,
        up=up,
        down=down,
        transactional=transactional,
    )


_Section = tuple[str, tuple[Statement, ...]]


def _parse_dbmate(
    display: str, lines: list[str], markers: dict[int, _Marker]
) -> tuple[_Section, _Section, bool]:
    seen: dict[str, int] = {}
    transactional = True
    for marker in markers.values():
        label = f"-- migrate:{marker.keyword}"
        if marker.keyword not in ("up", "down"):
            raise _fail(
                display,
                marker.line,
                f"unknown marker {_shown(marker.text)!r} (known: -- migrate:up, -- migrate:down)",
            )
        if marker.keyword in seen:
            raise _fail(
                display,
                marker.line,
                f"{label} appears twice (first on line {seen[marker.keyword]})",
            )
        if marker.keyword == "down" and "up" not in seen:
            raise _fail(display, marker.line, "-- migrate:down before -- migrate:up")
        for option in marker.rest.split():
            if option == "transaction:false":
                transactional = False
            elif option != "transaction:true":
                raise _fail(
                    display,
                    marker.line,
                    f"unknown option {_shown(option)!r} after {label} "
                    "(known: transaction:false, transaction:true)",
                )
        seen[marker.keyword] = marker.line
    up_line = seen["up"]  # there is a marker, the first one is up (down first raised above)
    down_line = seen.get("down")
    _no_sql_before(display, lines[: up_line - 1], "-- migrate:up")
    up = _section(lines[up_line : (down_line or len(lines) + 1) - 1], up_line + 1)
    if not up[1]:
        raise _fail(display, up_line, "the -- migrate:up section has no SQL statement")
    down = _section(lines[down_line:], down_line + 1) if down_line else ("", ())
    return up, down, transactional


_GOOSE_KEYWORDS = "Up, Down, StatementBegin, StatementEnd, NO TRANSACTION"


def _parse_goose(
    display: str, lines: list[str], markers: dict[int, _Marker]
) -> tuple[_Section, _Section, bool]:
    seen: dict[str, int] = {}
    before: list[str] = []
    section_lines: dict[str, list[str]] = {"up": [], "down": []}
    statements: dict[str, list[Statement]] = {"up": [], "down": []}
    current: str | None = None
    chunk: list[str] = []
    chunk_line = 0
    block: list[str] | None = None
    block_line = 0
    block_section = "up"
    transactional = True

    def flush_chunk() -> None:
        if current is not None and chunk:
            statements[current].extend(split_statements("\n".join(chunk), chunk_line))
        chunk.clear()

    def unclosed_block() -> ScriptError:
        return _fail(
            display,
            block_line,
            "-- +goose StatementBegin is not closed by a -- +goose StatementEnd",
        )

    for number, line in enumerate(lines, 1):
        marker = markers.get(number)
        keyword = marker.keyword if marker else None
        if keyword in ("up", "down"):
            label = f"-- +goose {keyword.capitalize()}"
            if block is not None:
                raise unclosed_block()
            if keyword in seen:
                raise _fail(
                    display, number, f"{label} appears twice (first on line {seen[keyword]})"
                )
            if keyword == "down" and "up" not in seen:
                raise _fail(display, number, "-- +goose Down before -- +goose Up")
            flush_chunk()
            seen[keyword], current, chunk_line = number, keyword, number + 1
            continue
        if keyword == "statementbegin":
            if current is None:
                raise _fail(display, number, "-- +goose StatementBegin before -- +goose Up")
            if block is not None:
                raise _fail(
                    display,
                    number,
                    f"-- +goose StatementBegin inside the StatementBegin of line {block_line}",
                )
            flush_chunk()
            section_lines[current].append(line)
            block, block_line, block_section = [], number, current
            continue
        if keyword == "statementend":
            if block is None:
                raise _fail(display, number, "-- +goose StatementEnd without StatementBegin")
            statements[block_section].extend(_whole_statement("\n".join(block), block_line + 1))
            section_lines[block_section].append(line)
            block, chunk_line = None, number + 1
            continue
        if keyword == "no transaction":
            if "no transaction" in seen:
                raise _fail(
                    display,
                    number,
                    "-- +goose NO TRANSACTION appears twice "
                    f"(first on line {seen['no transaction']})",
                )
            seen["no transaction"] = number
            transactional = False
        elif marker is not None and marker.keyword.startswith("envsub"):
            raise _fail(
                display,
                number,
                f"{_shown(marker.text)!r} is not supported: the console does not substitute "
                "environment variables",
            )
        elif marker is not None:
            raise _fail(
                display,
                number,
                f"unknown marker {_shown(marker.text)!r} (known: -- +goose {_GOOSE_KEYWORDS})",
            )
        # SQL, or a NO TRANSACTION line: a comment wherever it stands.
        if current is None:
            before.append(line)
            continue
        section_lines[current].append(line)
        (block if block is not None else chunk).append(line)
    if block is not None:
        raise unclosed_block()
    if "up" not in seen:
        raise _fail(display, 1, "no -- migrate:up or -- +goose Up section")
    flush_chunk()
    _no_sql_before(display, before, "-- +goose Up")
    up_text, _ = _join_trimmed(section_lines["up"])
    if not statements["up"]:
        raise _fail(display, seen["up"], "the -- +goose Up section has no SQL statement")
    down_text, _ = _join_trimmed(section_lines["down"])
    return (
        (up_text, tuple(statements["up"])),
        (down_text, tuple(statements["down"])),
        transactional,
    )


def _parse_plain(display: str, content: bytes) -> _Section:
    """A paired layout's file: plain SQL, where a marker means the file is misnamed."""
    lines = _decode(display, content)
    for number, marker in _markers(display, lines).items():
        raise _fail(
            display,
            number,
            f"{_shown(marker.text)!r} in a .up.sql/.down.sql file, which holds plain SQL: "
            "remove the marker or rename the file",
        )
    return _section(lines, 1)


def _parse_pair(
    up_display: str,
    up_filename: str,
    up_content: bytes,
    down_display: str | None,
    down_content: bytes | None,
) -> MigrationScript:
    name, version = _name_and_version(up_display, up_filename)
    up = _parse_plain(up_display, up_content)
    if not up[1]:
        raise _fail(up_display, 1, "the up file has no SQL statement")
    down = ("", ()) if down_display is None else _parse_plain(down_display, down_content or b"")
    return _script(
        version=version,
        name=name,
        filename=up_filename,
        layout="paired",
        up=up,
        down=down,
        transactional=True,
    )


# --- folders ---------------------------------------------------------------------------------
def version_key(version: str) -> tuple[int, str]:
    return (int(version), version)


def _refuse_link_out_of(root: Path, link: Path, display: str) -> None:
    """A symbolic link in the folder must point to a file in the folder: one pointing outside
    would import SQL nobody reviewing the folder sees, and a broken one a migration that
    silently is not there."""
    pointing_to = _shown(str(link.readlink()), 200)
    try:
        resolved = link.resolve(strict=True)
    except FileNotFoundError:
        raise _fail(
            display, 1, f"is a broken symbolic link (to {pointing_to}, which does not exist)"
        ) from None
    except (RuntimeError, OSError):  # a loop (RuntimeError before Python 3.13)
        raise _fail(
            display, 1, f"is a symbolic link that cannot be followed (to {pointing_to})"
        ) from None
    if not resolved.is_relative_to(root):
        raise _fail(
            display,
            1,
            f"is a symbolic link to {pointing_to}, outside the migrations folder: "
            "copy the file into the folder instead",
        )


def parse_directory(path: str | Path) -> list[MigrationScript]:
    """Every migration in a folder, sorted by version (numerically, then as text).

    Files not ending in ``.sql``, hidden files and subfolders are ignored. A symbolic link is
    followed only within the folder: one pointing outside it, or to nothing, is an error. Any
    error refuses the whole folder: nothing is returned partially.
    """
    directory = Path(path)
    shown = _shown(str(path), 200)
    try:
        if not directory.exists():
            raise ScriptError(f"the migrations folder {shown} does not exist")
        if not directory.is_dir():
            raise ScriptError(f"{shown} is not a folder: give the migrations folder")
        entries = sorted(directory.iterdir(), key=lambda entry: entry.name)
    except OSError as error:
        raise ScriptError(
            f"the migrations folder {shown} cannot be read ({error.strerror})"
        ) from None
    root = directory.resolve()
    label = _shown(root.name, 100)

    def display(filename: str) -> str:
        return f"{label}/{_shown(filename, 200)}" if label else _shown(filename, 200)

    contents: dict[str, bytes] = {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(".sql"):
            continue
        try:
            if entry.is_symlink():
                _refuse_link_out_of(root, entry, display(entry.name))
            if not entry.is_file():
                continue
            contents[entry.name] = entry.read_bytes()
        except OSError as error:
            raise _fail(display(entry.name), 1, f"cannot be read ({error.strerror})") from None

    scripts = []
    for filename, content in contents.items():
        if filename.endswith(".down.sql"):
            up_filename = filename[: -len(".down.sql")] + ".up.sql"
            if up_filename not in contents:
                raise _fail(
                    display(filename), 1, f"a down file without its up file {_shown(up_filename)}"
                )
            continue
        if filename.endswith(".up.sql"):
            down_filename = filename[: -len(".up.sql")] + ".down.sql"
            has_down = down_filename in contents
            scripts.append(
                _parse_pair(
                    display(filename),
                    filename,
                    content,
                    display(down_filename) if has_down else None,
                    contents.get(down_filename),
                )
            )
        else:
            scripts.append(_parse_single(display(filename), filename, content))

    by_version: dict[int, MigrationScript] = {}
    for script in scripts:
        other = by_version.setdefault(int(script.version), script)
        if other is not script:
            raise _fail(
                display(script.filename),
                1,
                f"version {script.version} is also used by {_shown(other.filename)}",
            )
    return sorted(scripts, key=lambda script: version_key(script.version))
