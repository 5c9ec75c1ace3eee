"""The migrations-folder parser: layouts, ordering, checksums, errors, statement splitting."""

import hashlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrations_ops import engine
from migrations_ops.engine import (
    EngineError,
    MigrationScript,
    ScriptError,
    Statement,
    normalise,
    parse_directory,
    parse_file,
    split_statements,
)

PLPGSQL_FUNCTION = """CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;"""


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "migrations"
    path.mkdir()
    return path


def write(folder, name, content):
    data = content if isinstance(content, bytes) else content.encode()
    (folder / name).write_bytes(data)


def sqls(statements):
    return [statement.sql for statement in statements]


def lines(statements):
    return [statement.line for statement in statements]


def raises_script_error(message):
    return pytest.raises(ScriptError, match=f"^{re.escape(message)}")


# --- layouts -------------------------------------------------------------------------------------
DBMATE = """-- the users table
-- migrate:up
CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL);

INSERT INTO users VALUES (1, 'a;b@example.com');
-- migrate:down
DROP TABLE users;
"""


def test_dbmate_file():
    script = parse_file("001_create_users.sql", DBMATE.encode())
    assert isinstance(script, MigrationScript)
    assert (script.version, script.name, script.filename, script.layout) == (
        "001",
        "001_create_users",
        "001_create_users.sql",
        "dbmate",
    )
    assert script.up_statements == (
        Statement("CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL)", 3),
        Statement("INSERT INTO users VALUES (1, 'a;b@example.com')", 5),
    )
    assert script.down_statements == (Statement("DROP TABLE users", 7),)
    assert script.up_sql == (
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL);\n\n"
        "INSERT INTO users VALUES (1, 'a;b@example.com');"
    )
    assert script.down_sql == "DROP TABLE users;"
    assert script.transactional is True
    assert script.needs_no_transaction == ()


def test_dbmate_without_down_section():
    script = parse_file("7_x.sql", b"-- migrate:up\nSELECT 1;\n")
    assert (script.down_sql, script.down_statements) == ("", ())
    assert script.up_statements == (Statement("SELECT 1", 2),)


GOOSE = f"""-- +goose Up
CREATE TABLE posts (id bigint, updated_at timestamptz);

-- +goose StatementBegin
{PLPGSQL_FUNCTION}
-- +goose StatementEnd
CREATE TRIGGER posts_touch BEFORE UPDATE ON posts
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

-- +goose Down
-- +goose StatementBegin
DROP TRIGGER posts_touch ON posts;
DROP FUNCTION touch_updated_at();
-- +goose StatementEnd
DROP TABLE posts;
"""


def test_goose_file_keeps_a_statement_block_whole():
    script = parse_file("20240101120000_posts.sql", GOOSE.encode())
    assert (script.version, script.name, script.layout) == (
        "20240101120000",
        "20240101120000_posts",
        "goose",
    )
    assert sqls(script.up_statements) == [
        "CREATE TABLE posts (id bigint, updated_at timestamptz)",
        PLPGSQL_FUNCTION.removesuffix(";"),
        "CREATE TRIGGER posts_touch BEFORE UPDATE ON posts\n"
        "    FOR EACH ROW EXECUTE FUNCTION touch_updated_at()",
    ]
    assert lines(script.up_statements) == [2, 5, 12]
    # A block is one statement even with semicolons between its statements.
    assert script.down_statements == (
        Statement("DROP TRIGGER posts_touch ON posts;\nDROP FUNCTION touch_updated_at()", 17),
        Statement("DROP TABLE posts", 20),
    )
    assert script.up_sql.startswith("CREATE TABLE posts")
    assert script.up_sql.endswith("EXECUTE FUNCTION touch_updated_at();")
    assert script.down_sql.startswith("-- +goose StatementBegin\nDROP TRIGGER")
    assert script.transactional is True


def test_goose_markers_are_case_insensitive():
    script = parse_file("1_x.sql", b"-- +goose up\nSELECT 1;\n--  +goose   DOWN\nSELECT 2;")
    assert sqls(script.up_statements) == ["SELECT 1"]
    assert sqls(script.down_statements) == ["SELECT 2"]


def test_paired_files(folder):
    write(folder, "001_users.up.sql", "\n\nCREATE TABLE users (id int);\nSELECT 1;\n")
    write(folder, "001_users.down.sql", "DROP TABLE users;\n")
    write(folder, "002_no_down.up.sql", "CREATE TABLE t (id int);")
    first, second = parse_directory(folder)
    assert (first.version, first.name, first.filename, first.layout) == (
        "001",
        "001_users",
        "001_users.up.sql",
        "paired",
    )
    assert first.up_statements == (
        Statement("CREATE TABLE users (id int)", 3),
        Statement("SELECT 1", 4),
    )
    assert first.up_sql == "CREATE TABLE users (id int);\nSELECT 1;"
    assert first.down_statements == (Statement("DROP TABLE users", 1),)
    assert first.transactional is True
    assert (second.name, second.down_sql, second.down_statements) == ("002_no_down", "", ())


def test_directory_reads_every_layout_and_ignores_other_files(folder):
    write(folder, "001_a.sql", "-- migrate:up\nSELECT 1;\n")
    write(folder, "002_b.sql", "-- +goose Up\nSELECT 2;\n")
    write(folder, "003_c.up.sql", "SELECT 3;")
    write(folder, "README.md", "# not a migration; -- migrate:down")
    write(folder, "004_d.js", "exports.up = () => {}")
    write(folder, ".005_hidden.sql", "not sql at all")
    (folder / "006_subfolder.sql").mkdir()
    scripts = parse_directory(str(folder))
    assert [(s.filename, s.layout) for s in scripts] == [
        ("001_a.sql", "dbmate"),
        ("002_b.sql", "goose"),
        ("003_c.up.sql", "paired"),
    ]


def test_directory_is_sorted_by_version_numerically_then_as_text(folder):
    for name in ("10_c.sql", "9_b.sql", "20240101120000_e.sql", "0011_d.sql", "2_a.sql"):
        write(folder, name, "-- migrate:up\nSELECT 1;")
    assert [s.version for s in parse_directory(folder)] == [
        "2",
        "9",
        "10",
        "0011",
        "20240101120000",
    ]


def test_empty_directory_has_no_scripts(folder):
    assert parse_directory(folder) == []


# --- normalising and checksums -------------------------------------------------------------------
def test_normalise():
    assert normalise("\ufeff\r\n  \nSELECT 1;  \r\n\tSELECT 2;\t\rSELECT 3;\n\n \n") == (
        "SELECT 1;\n\tSELECT 2;\nSELECT 3;"
    )
    assert normalise("") == ""
    assert normalise("a\n\n\nb") == "a\n\n\nb"  # blank lines inside are kept


def test_checksum_is_sha256_of_normalised_up_and_down():
    script = parse_file("1_x.sql", b"-- migrate:up\nSELECT 1;   \n\n-- migrate:down\nSELECT 2;\n")
    expected = hashlib.sha256(b"SELECT 1;\n-- down --\nSELECT 2;").hexdigest()
    assert script.checksum == expected


def test_checksum_is_stable_across_line_endings_bom_and_trailing_blanks():
    lf = "-- migrate:up\nCREATE TABLE t (id int);\nSELECT 'x';\n-- migrate:down\nDROP TABLE t;\n"
    variants = [
        lf.replace("\n", "\r\n"),
        lf.replace("\n", "\r"),
        "\ufeff" + lf,
        lf.replace(";\n", ";   \t\n"),
        "\n\n" + lf.replace("-- migrate:down\n", "\n\n-- migrate:down\n\n") + "\n\n",
    ]
    base = parse_file("1_x.sql", lf.encode())
    for variant in variants:
        script = parse_file("1_x.sql", variant.encode())
        assert script.checksum == base.checksum, variant
        assert script.up_sql == base.up_sql
        assert sqls(script.up_statements) == sqls(base.up_statements)


def test_crlf_keeps_line_numbers(folder):
    text = "-- migrate:up\r\n\r\nSELECT 1;\r\nSELECT\r\n  2;\r\n"
    write(folder, "1_x.sql", text)
    (script,) = parse_directory(folder)
    assert script.up_statements == (Statement("SELECT 1", 3), Statement("SELECT\n  2", 4))


def test_a_real_change_changes_the_checksum():
    base = "-- migrate:up\nSELECT 1;\n-- migrate:down\nSELECT 2;\n"
    checksum = parse_file("1_x.sql", base.encode()).checksum
    changes = [
        base.replace("SELECT 1", "SELECT 10"),
        base.replace("SELECT 2", "SELECT 3"),
        base.replace("SELECT 1;", "SELECT  1;"),
        base.replace("SELECT 1;\n", "SELECT 1;\nSELECT 2;\n"),
        # The same SQL moved from one section to the other.
        "-- migrate:up\nSELECT 1;\nSELECT 2;\n-- migrate:down\n",
    ]
    checksums = {parse_file("1_x.sql", change.encode()).checksum for change in changes}
    assert checksum not in checksums
    assert len(checksums) == len(changes)


def test_paired_and_single_file_checksums_agree(folder):
    write(folder, "1_x.up.sql", "SELECT 1;\r\n")
    write(folder, "1_x.down.sql", "SELECT 2;\r\n")
    (paired,) = parse_directory(folder)
    single = parse_file("1_x.sql", b"-- migrate:up\nSELECT 1;\n-- migrate:down\nSELECT 2;\n")
    assert paired.checksum == single.checksum


# --- transactions ---------------------------------------------------------------------------------
def test_dbmate_transaction_false():
    script = parse_file(
        "1_x.sql",
        b"-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY i ON t (a);\n"
        b"-- migrate:down\nDROP INDEX i;\n",
    )
    assert script.transactional is False
    assert parse_file("1_x.sql", b"-- migrate:up transaction:true\nSELECT 1;").transactional


def test_dbmate_transaction_false_on_the_down_section_marks_the_script():
    script = parse_file(
        "1_x.sql", b"-- migrate:up\nSELECT 1;\n-- migrate:down  transaction:false\nVACUUM;\n"
    )
    assert script.transactional is False
    assert script.needs_no_transaction == ("VACUUM",)


def test_goose_no_transaction():
    script = parse_file("1_x.sql", b"-- +goose NO TRANSACTION\n-- +goose Up\nSELECT 1;\n")
    assert script.transactional is False
    assert script.up_statements == (Statement("SELECT 1", 3),)
    assert parse_file("1_x.sql", b"-- +goose Up\nSELECT 1;\n").transactional is True


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX CONCURRENTLY users_email ON users (email)",
        "create unique index concurrently if not exists u ON users (email)",
        "DROP INDEX CONCURRENTLY IF EXISTS users_email",
        "REINDEX INDEX CONCURRENTLY users_email",
        "REINDEX (VERBOSE) TABLE CONCURRENTLY users",
        "REINDEX DATABASE app",
        "VACUUM (ANALYZE) users",
        "vacuum",
        "ALTER TYPE mood ADD VALUE 'meh' AFTER 'ok'",
        "ALTER TYPE public.mood ADD VALUE IF NOT EXISTS 'meh'",
        "CREATE DATABASE other",
        "DROP DATABASE other",
        "ALTER SYSTEM SET work_mem = '64MB'",
        "CREATE TABLESPACE fast LOCATION '/ssd'",
        "ALTER TABLE m DETACH PARTITION m_2020 CONCURRENTLY",
        "/* leading comment */ CREATE\n  INDEX\tCONCURRENTLY i ON t (a)",
    ],
)
def test_statements_that_cannot_run_in_a_transaction_are_reported(sql):
    script = parse_file("1_x.sql", f"-- migrate:up\nSELECT 1;\n{sql};\n".encode())
    first_line = " ".join(split_statements(sql)[0].sql.split("\n")[0].split())
    assert script.needs_no_transaction == (first_line,)
    assert script.transactional is True  # not marked: the runner decides from the list


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX users_email ON users (email)",
        "CREATE INDEX concurrently_named ON t (a)",
        "INSERT INTO notes VALUES ('VACUUM later; CREATE INDEX CONCURRENTLY x')",
        "-- VACUUM\nSELECT 1",
        'CREATE TABLE "vacuum" (id int)',
        "ALTER TYPE address ADD ATTRIBUTE value text",
        "ALTER TYPE mood RENAME VALUE 'a' TO 'b'",
        "ALTER TABLE m DETACH PARTITION m_2020",
        "SELECT 'REINDEX DATABASE x'",
        "ANALYZE users",
    ],
)
def test_statements_that_run_in_a_transaction_are_not_reported(sql):
    script = parse_file("1_x.sql", f"-- migrate:up\n{sql};\n".encode())
    assert script.needs_no_transaction == ()


def test_concurrently_in_goose_block_and_paired_files(folder):
    write(folder, "1_x.up.sql", "SELECT 1;\nCREATE INDEX CONCURRENTLY i\n  ON t (a);\n")
    write(folder, "1_x.down.sql", "DROP INDEX CONCURRENTLY i;")
    write(
        folder,
        "2_y.sql",
        "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\nVACUUM t;\n-- +goose StatementEnd\n",
    )
    paired, goose = parse_directory(folder)
    assert paired.needs_no_transaction == (
        "CREATE INDEX CONCURRENTLY i",
        "DROP INDEX CONCURRENTLY i",
    )
    assert goose.needs_no_transaction == ("SELECT 1;",)


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("CREATE TABLE t (id int);\n", "migrations/003_x.sql:1: no -- migrate:up or -- +goose Up"),
        ("", "migrations/003_x.sql:1: no -- migrate:up or -- +goose Up section"),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:upp\n",
            "migrations/003_x.sql:3: unknown marker '-- migrate:upp'",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:\n",
            "migrations/003_x.sql:3: unknown marker '-- migrate:'",
        ),
        (
            "-- +goose Up\nSELECT 1;\n\n-- +goose Sideways\n",
            "migrations/003_x.sql:4: unknown marker '-- +goose Sideways'",
        ),
        ("-- +goose\n", "migrations/003_x.sql:1: unknown marker '-- +goose'"),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:down\nSELECT 2;\n\n-- migrate:down\n",
            "migrations/003_x.sql:6: -- migrate:down appears twice (first on line 3)",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:up\nSELECT 2;\n",
            "migrations/003_x.sql:3: -- migrate:up appears twice (first on line 1)",
        ),
        (
            "-- +goose Up\nSELECT 1;\n-- +goose Up\n",
            "migrations/003_x.sql:3: -- +goose Up appears twice (first on line 1)",
        ),
        (
            "-- +goose Up\nSELECT 1;\n-- +goose Down\n-- +goose Down\n",
            "migrations/003_x.sql:4: -- +goose Down appears twice (first on line 3)",
        ),
        (
            "-- migrate:down\nDROP TABLE t;\n-- migrate:up\nCREATE TABLE t (id int);\n",
            "migrations/003_x.sql:1: -- migrate:down before -- migrate:up",
        ),
        ("\n-- +goose Down\nSELECT 1;\n", "migrations/003_x.sql:2: -- +goose Down before"),
        (
            "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n",
            "migrations/003_x.sql:2: -- +goose StatementBegin is not closed by a",
        ),
        (
            "-- +goose Up\nSELECT 1;\n-- +goose StatementBegin\nSELECT 2;\n-- +goose Down\n",
            "migrations/003_x.sql:3: -- +goose StatementBegin is not closed by a",
        ),
        (
            "-- +goose Up\nSELECT 1;\n\n-- +goose StatementEnd\n",
            "migrations/003_x.sql:4: -- +goose StatementEnd without StatementBegin",
        ),
        (
            "-- +goose Up\n-- +goose StatementBegin\n-- +goose StatementBegin\n",
            "migrations/003_x.sql:3: -- +goose StatementBegin inside the StatementBegin of line 2",
        ),
        (
            "-- +goose StatementBegin\nSELECT 1;\n-- +goose StatementEnd\n-- +goose Up\n",
            "migrations/003_x.sql:1: -- +goose StatementBegin before -- +goose Up",
        ),
        (
            "-- comment\n-- migrate:up\n-- only a comment\n\n-- migrate:down\nSELECT 1;\n",
            "migrations/003_x.sql:2: the -- migrate:up section has no SQL statement",
        ),
        (
            "-- migrate:up\n-- migrate:down\nSELECT 1;\n",
            "migrations/003_x.sql:1: the -- migrate:up section has no SQL statement",
        ),
        (
            "-- +goose NO TRANSACTION\n\n-- +goose Up\n\n-- +goose Down\nSELECT 1;",
            "migrations/003_x.sql:3: the -- +goose Up section has no SQL statement",
        ),
        (
            "-- +goose NO TRANSACTION\n-- +goose Up\nSELECT 1;\n-- +goose NO TRANSACTION\n",
            "migrations/003_x.sql:4: -- +goose NO TRANSACTION appears twice (first on line 1)",
        ),
        ("-- +goose NO TRANSACTION\n", "migrations/003_x.sql:1: no -- migrate:up or -- +goose Up"),
        (
            "-- migrate:up transactions:false\nSELECT 1;\n",
            "migrations/003_x.sql:1: unknown option 'transactions:false' after -- migrate:up",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- +goose Down\nSELECT 2;\n",
            "migrations/003_x.sql:3: '-- +goose Down' mixes goose and dbmate markers (line 1",
        ),
        (
            "-- header\nCREATE TABLE t (id int);\n-- migrate:up\nSELECT 1;\n",
            "migrations/003_x.sql:2: SQL before -- migrate:up (it would never run)",
        ),
        (
            "/* a\nblock */ SELECT 0;\n-- +goose Up\nSELECT 1;\n",
            "migrations/003_x.sql:2: SQL before -- +goose Up (it would never run)",
        ),
        (
            "-- migrate:up\nSELECT 1;\n  -- migrate:down\nSELECT 2;\n",
            "migrations/003_x.sql:3: the marker '-- migrate:down' must start at the line's start",
        ),
        (
            "-- +goose ENVSUB ON\n-- +goose Up\nSELECT '${X}';\n",
            "migrations/003_x.sql:1: '-- +goose ENVSUB ON' is not supported",
        ),
        (
            "-- migrate:up\nSELECT 1;\nSELECT '\x00';\n",
            "migrations/003_x.sql:3: holds a NUL character",
        ),
    ],
)
def test_file_errors_name_file_and_line(folder, content, message):
    write(folder, "001_good.sql", "-- migrate:up\nSELECT 1;\n")
    write(folder, "003_x.sql", content)
    with raises_script_error(message):
        parse_directory(folder)
    with raises_script_error(message.replace("migrations/", "")):
        parse_file("003_x.sql", content.encode())


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"\xff-- migrate:up\n", 1),
        (b"-- migrate:up\nSELECT 1;\nSELECT '\xe9t\xe9';\n", 3),
        (b"-- migrate:up\r\nSELECT 1;\r\n\r\nSELECT '\xc3';\r\n", 4),
        (b"-- migrate:up\rSELECT 1;\rSELECT '\x80';\r", 3),
        (b"\xff\xfe-\x00-\x00", 1),  # UTF-16
    ],
)
def test_not_utf8_names_the_line_of_the_first_bad_byte(content, line):
    with raises_script_error(f"migrations/003_x.sql:{line}: is not UTF-8 text (byte 0x"):
        parse_file("migrations/003_x.sql", content)


def test_bom_is_accepted():
    script = parse_file("1_x.sql", b"\xef\xbb\xbf-- migrate:up\nSELECT 1;\n")
    assert script.up_statements == (Statement("SELECT 1", 2),)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ("001_a.sql", "001_b.sql"),
            "migrations/001_b.sql:1: version 001 is also used by 001_a.sql",
        ),
        (("001_a.sql", "1_b.sql"), "migrations/1_b.sql:1: version 1 is also used by 001_a.sql"),
        (
            ("002_x.sql", "002_x.up.sql"),
            "migrations/002_x.up.sql:1: version 002 is also used by 002_x.sql",
        ),
    ],
)
def test_duplicate_versions_name_both_files(folder, names, message):
    for name in names:
        write(folder, name, "SELECT 1;" if name.endswith(".up.sql") else "-- migrate:up\nSELECT 1;")
    with raises_script_error(message):
        parse_directory(folder)


@pytest.mark.parametrize("name", ["create_users.sql", "v1_users.sql", "_1.sql", ".sql"])
def test_name_without_version_prefix(name):
    with raises_script_error(f"{name}:1: the name has no version prefix"):
        parse_file(name, b"-- migrate:up\nSELECT 1;\n")


def test_name_without_version_prefix_in_a_folder(folder):
    write(folder, "init.up.sql", "SELECT 1;")
    with raises_script_error("migrations/init.up.sql:1: the name has no version prefix"):
        parse_directory(folder)


def test_down_file_without_up_file(folder):
    write(folder, "001_a.up.sql", "SELECT 1;")
    write(folder, "002_b.down.sql", "SELECT 1;")
    with raises_script_error(
        "migrations/002_b.down.sql:1: a down file without its up file 002_b.up.sql"
    ):
        parse_directory(folder)


def test_paired_file_errors(folder):
    write(folder, "001_a.up.sql", "-- nothing\n\n")
    with raises_script_error("migrations/001_a.up.sql:1: the up file has no SQL statement"):
        parse_directory(folder)
    write(folder, "001_a.up.sql", "SELECT 1;")
    write(folder, "001_a.down.sql", "SELECT 1;\n-- migrate:down\nSELECT 2;")
    with raises_script_error(
        "migrations/001_a.down.sql:2: '-- migrate:down' in a .up.sql/.down.sql file"
    ):
        parse_directory(folder)


def test_missing_folder_and_file_path(tmp_path):
    with raises_script_error(f"the migrations folder {tmp_path / 'nope'} does not exist"):
        parse_directory(tmp_path / "nope")
    path = tmp_path / "001_x.sql"
    path.write_text("-- migrate:up\nSELECT 1;")
    with raises_script_error(f"{path} is not a folder"):
        parse_directory(str(path))


def test_one_bad_file_refuses_the_whole_folder(folder):
    for version in range(1, 6):
        write(folder, f"{version:03}_ok.sql", "-- migrate:up\nSELECT 1;\n")
    write(folder, "004_bad.sql", "-- migrate:up\nSELECT 1;\n-- migrate:sideways\n")
    with raises_script_error("migrations/004_bad.sql:3: unknown marker"):
        parse_directory(folder)


def test_script_error_is_an_engine_error():
    assert issubclass(ScriptError, EngineError)
    assert engine.ScriptError is ScriptError


def test_error_messages_are_one_line_even_with_odd_names_and_markers():
    with pytest.raises(ScriptError) as caught:
        parse_file("1_a\nb.sql", b"-- migrate:up\nSELECT 1;\n")
    assert "\n" not in str(caught.value)
    with pytest.raises(ScriptError) as caught:
        parse_file("1_x.sql", "-- migrate:up\nSELECT 1;\n-- migrate:\u2028up\n".encode())
    assert len(str(caught.value).splitlines()) == 1
    assert "\\u2028" in str(caught.value)


# --- splitting ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1; SELECT 2", ["SELECT 1", "SELECT 2"]),
        (
            "SELECT 'a;b' ; SELECT 'it''s; -- not a comment'",
            ["SELECT 'a;b'", "SELECT 'it''s; -- not a comment'"],
        ),
        ("SELECT E'it\\'s;' ; SELECT 2", ["SELECT E'it\\'s;'", "SELECT 2"]),
        ("SELECT 'back\\'; SELECT 2", ["SELECT 'back\\'", "SELECT 2"]),
        ('SELECT "a;b""c" FROM t; SELECT 2', ['SELECT "a;b""c" FROM t', "SELECT 2"]),
        ("SELECT `a;b` FROM t; SELECT 2", ["SELECT `a;b` FROM t", "SELECT 2"]),
        ("SELECT $$a;b$$; SELECT 2", ["SELECT $$a;b$$", "SELECT 2"]),
        ("SELECT $fn$ $$;$$ ' ; $fn$; SELECT 2", ["SELECT $fn$ $$;$$ ' ; $fn$", "SELECT 2"]),
        ("SELECT $a$x;$b$;$a$; SELECT 2", ["SELECT $a$x;$b$;$a$", "SELECT 2"]),
        ("SELECT a$b$c, $1; SELECT $2", ["SELECT a$b$c, $1", "SELECT $2"]),
        ("SELECT 1 -- trailing; comment\n; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("SELECT /* ; */ 1; /* x */ SELECT 2", ["SELECT /* ; */ 1", "SELECT 2"]),
        ("SELECT 1 /* a /* nested ; */ still; */; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("-- only a comment;\n/* and; another */ ;;", []),
        ("SELECT 1;;;SELECT 2;", ["SELECT 1", "SELECT 2"]),
        ("SELECT 'unterminated; SELECT 2", ["SELECT 'unterminated; SELECT 2"]),
        (
            "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); "
            "INSERT INTO b VALUES (2)); SELECT 2",
            [
                "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); "
                "INSERT INTO b VALUES (2))",
                "SELECT 2",
            ],
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN true "
            "THEN 1 END;\n  SELECT 2;\nEND; SELECT 3",
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT CASE WHEN "
                "true THEN 1 END;\n  SELECT 2;\nEND",
                "SELECT 3",
            ],
        ),
        (
            "CREATE TRIGGER t AFTER INSERT ON a BEGIN UPDATE b SET x = 1; END; SELECT 2",
            ["CREATE TRIGGER t AFTER INSERT ON a BEGIN UPDATE b SET x = 1; END", "SELECT 2"],
        ),
        # sqlparse glues everything after a column named "begin" into one statement.
        (
            "ALTER TABLE t ADD COLUMN begin text; UPDATE t SET begin = 'x'; SELECT 2",
            ["ALTER TABLE t ADD COLUMN begin text", "UPDATE t SET begin = 'x'", "SELECT 2"],
        ),
        ("BEGIN; SELECT 1; COMMIT;", ["BEGIN", "SELECT 1", "COMMIT"]),
    ],
)
def test_split_statements(sql, expected):
    assert sqls(split_statements(sql)) == expected


def test_split_statements_lines():
    sql = (
        "\n-- a comment\nSELECT 1;  SELECT\n  2;\n\n/* multi\nline */\nSELECT $$\n;\n$$;\nSELECT 4"
    )
    assert split_statements(sql) == (
        Statement("SELECT 1", 3),
        Statement("SELECT\n  2", 3),
        Statement("SELECT $$\n;\n$$", 8),
        Statement("SELECT 4", 11),
    )
    assert lines(split_statements(sql, first_line=40)) == [42, 42, 47, 50]


def test_dollar_quoted_function_in_a_dbmate_file():
    content = f"-- migrate:up\n{PLPGSQL_FUNCTION}\nSELECT 1;\n-- migrate:down\nSELECT 2;\n"
    script = parse_file("1_fn.sql", content.encode())
    assert script.up_statements == (
        Statement(PLPGSQL_FUNCTION.removesuffix(";"), 2),
        Statement("SELECT 1", 8),
    )


# --- properties --------------------------------------------------------------------------------
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MARKER_LINES = [
    "-- migrate:up",
    "-- migrate:down",
    "-- migrate:up transaction:false",
    "-- migrate:sideways",
    "  -- migrate:down",
    "-- +goose Up",
    "-- +goose Down",
    "-- +goose StatementBegin",
    "-- +goose StatementEnd",
    "-- +goose NO TRANSACTION",
    "-- +goose ENVSUB ON",
    "-- +goose",
]
SQL_ALPHABET = "ab $;'\"`-/*()\\\nEe1"


def assert_script_error_shape(error, display):
    message = str(error)
    assert len(message.splitlines()) == 1
    assert re.match(rf"{re.escape(display)}:\d+: \S", message), message


@FAST
@given(content=st.binary(max_size=300), name=st.sampled_from(["1_x.sql", "x.sql", "9.sql"]))
def test_parse_file_on_any_bytes_raises_only_script_error(content, name):
    try:
        script = parse_file(name, content)
    except ScriptError as error:
        assert_script_error_shape(error, name)
    else:
        assert script.up_statements


def outcome(content):
    try:
        return parse_file("1_x.sql", content)
    except ScriptError as error:
        assert_script_error_shape(error, "1_x.sql")
        return str(error)


@FAST
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(MARKER_LINES),
            st.text(alphabet=SQL_ALPHABET, max_size=25),
            st.text(st.characters(exclude_characters="\r\n"), max_size=10),
        ),
        max_size=12,
    ),
    line_end=st.sampled_from(["\r\n", "\r"]),
)
def test_parse_file_on_marker_heavy_text_raises_only_script_error(parts, line_end):
    content = "\n".join(parts)
    result = outcome(content.encode("utf-8", "surrogatepass"))
    if isinstance(result, MigrationScript):
        assert result.layout in ("dbmate", "goose")
        assert result.up_statements
        for statement in result.up_statements + result.down_statements:
            assert statement.sql == statement.sql.strip()
            assert statement.line >= 1
    # Line endings never change the outcome: the same script, or the same error.
    assert outcome(content.replace("\n", line_end).encode("utf-8", "surrogatepass")) == result


# Generated statements: tokens a dbmate file may hold, built so the expected split is known.
WORD = st.sampled_from(["select", "insert", "into", "t", "x1", "values", "from", "where", "a$b"])
STRING_BODY = st.text(alphabet='ab ;-/*$"', max_size=8)
TOKEN = st.one_of(
    WORD,
    STRING_BODY.map(lambda s: "'" + s + "'"),
    st.text(alphabet="ab ;-'", max_size=8).map(lambda s: '"' + s.replace('"', '""') + '"'),
    st.text(alphabet="ab ;-'\n", max_size=8)
    .filter(lambda s: " \n" not in s)
    .map(lambda s: "$$" + s + "$$"),
    st.text(alphabet="ab ;-'$\n", max_size=8)
    .filter(lambda s: "$q$" not in s and " \n" not in s and not s.endswith("$q"))
    .map(lambda s: "$q$" + s + "$q$"),
    st.sampled_from(["(1)", "(a, 'b;')", "=", "1", ","]),
)
STATEMENT = st.lists(
    st.tuples(TOKEN, st.sampled_from([" ", "\n", " /* c; */ ", " -- c;\n"])), min_size=1, max_size=6
).map(lambda pairs: "".join(token + gap for token, gap in pairs[:-1]) + pairs[-1][0])
GAP = st.sampled_from([";\n", ";", "; -- after;\n", ";\n\n/* between; */\n", ";\n-- whole line\n"])


def build_section(statements, gaps):
    """Section text and the (sql, line) pairs a parse must find, counting lines from 1."""
    text, expected = "", []
    for statement, gap in zip(statements, gaps, strict=True):
        expected.append((statement, text.count("\n") + 1))
        text += statement + gap
    return text, expected


@FAST
@given(
    up=st.lists(st.tuples(STATEMENT, GAP), min_size=1, max_size=5),
    down=st.lists(st.tuples(STATEMENT, GAP), max_size=4),
    header=st.sampled_from(["", "-- a header\n", "\n\n"]),
    crlf=st.booleans(),
)
def test_well_formed_dbmate_files_round_trip(up, down, header, crlf):
    up_text, up_expected = build_section(*zip(*up, strict=True))
    down_text, down_expected = build_section(*zip(*down, strict=True)) if down else ("", [])
    head = header + "-- migrate:up\n"
    middle = "-- migrate:down\n"
    content = head + up_text + "\n" + middle + down_text
    up_first = head.count("\n")
    down_first = (head + up_text + "\n" + middle).count("\n")
    if crlf:
        content = content.replace("\n", "\r\n")
    script = parse_file("20240101_x.sql", content.encode())
    assert [(s.sql, s.line) for s in script.up_statements] == [
        (sql, line + up_first) for sql, line in up_expected
    ]
    assert [(s.sql, s.line) for s in script.down_statements] == [
        (sql, line + down_first) for sql, line in down_expected
    ]
    assert script.up_sql == normalise(up_text)
    assert script.down_sql == normalise(down_text)


def is_comments_and_separators(gap, *, at_end):
    """An independent check that text between statements is only whitespace, ';' and comments
    (block comments nest). A comment may stay open only when the gap ends the text."""
    position = 0
    while position < len(gap):
        if gap[position] in " \t\n\r\f\v;":
            position += 1
        elif gap.startswith("--", position):
            newline = gap.find("\n", position)
            if newline == -1:
                return at_end
            position = newline
        elif gap.startswith("/*", position):
            depth, position = 1, position + 2
            while depth and position < len(gap):
                if gap.startswith("/*", position):
                    depth, position = depth + 1, position + 2
                elif gap.startswith("*/", position):
                    depth, position = depth - 1, position + 2
                else:
                    position += 1
            if depth:
                return at_end
        else:
            return False
    return True


@FAST
@given(sql=st.text(alphabet=SQL_ALPHABET + "x\t", max_size=80), first_line=st.integers(1, 50))
def test_split_statements_never_loses_non_comment_text(sql, first_line):
    position = 0
    for statement in split_statements(sql, first_line):
        assert statement.sql and statement.sql == statement.sql.strip()
        # Its place: the first occurrence after the previous statement that is on its line and
        # has only separators and whole comments before it.
        start = position
        while True:
            start = sql.find(statement.sql, start)
            assert start != -1, (sql, statement)
            if first_line + sql.count("\n", 0, start) == statement.line and (
                is_comments_and_separators(sql[position:start], at_end=False)
            ):
                break
            start += 1
        position = start + len(statement.sql)
    assert is_comments_and_separators(sql[position:], at_end=True), (sql, position)


@FAST
@given(text=st.text(alphabet=" \t\n\ufeffab;", max_size=40))
def test_normalise_is_idempotent_and_ignores_line_endings(text):
    once = normalise(text)
    assert normalise(once) == once
    assert normalise(text.replace("\n", "\r\n")) == once
    assert normalise(text.replace("\n", "\r")) == once
    assert not once.startswith(("\n", "\ufeff")) and not once.endswith("\n")
    assert all(line == line.rstrip() for line in once.split("\n"))


# --- what the console can store, and where the files are ------------------------------------------
def test_a_version_prefix_longer_than_the_column_is_refused():
    longest = "9" * 40
    assert parse_file(f"{longest}_x.sql", b"-- migrate:up\nSELECT 1;\n").version == longest
    for digits in (41, 64):
        with raises_script_error(f"{'9' * digits}_x.sql:1: the version prefix is longer than 40"):
            parse_file(f"{'9' * digits}_x.sql", b"-- migrate:up\nSELECT 1;\n")


def test_the_engine_reads_no_longer_version_than_the_console_stores():
    from migrations_ops.models import MigrationScript as MigrationScriptRow

    column = MigrationScriptRow._meta.get_field("version").max_length
    assert column == engine.MAX_VERSION_DIGITS


def test_a_symbolic_link_within_the_folder_is_read(folder):
    write(folder, "001_a.sql", "-- migrate:up\nSELECT 1;\n")
    (folder / "002_b.sql").symlink_to("001_a.sql")  # the same SQL under a second version
    scripts = parse_directory(folder)
    assert [script.filename for script in scripts] == ["001_a.sql", "002_b.sql"]


def test_a_symbolic_link_out_of_the_folder_refuses_the_folder(folder, tmp_path):
    outside = tmp_path / "secret.sql"
    outside.write_text("-- migrate:up\nDROP TABLE users;\n")
    write(folder, "001_a.sql", "-- migrate:up\nSELECT 1;\n")
    (folder / "002_b.sql").symlink_to(outside)
    with raises_script_error(
        f"migrations/002_b.sql:1: is a symbolic link to {outside}, outside the migrations "
        "folder: copy the file into the folder instead"
    ):
        parse_directory(folder)
    (folder / "002_b.sql").unlink()
    (folder / "002_b.sql").symlink_to("../secret.sql")
    with raises_script_error("migrations/002_b.sql:1: is a symbolic link to ../secret.sql, out"):
        parse_directory(folder)


def test_a_broken_symbolic_link_refuses_the_folder(folder):
    write(folder, "001_a.sql", "-- migrate:up\nSELECT 1;\n")
    (folder / "002_b.sql").symlink_to("002_gone.sql")
    with raises_script_error(
        "migrations/002_b.sql:1: is a broken symbolic link (to 002_gone.sql, which does not exist)"
    ):
        parse_directory(folder)
    (folder / "002_b.sql").unlink()
    (folder / "002_b.sql").symlink_to("002_b.sql")
    with raises_script_error("migrations/002_b.sql:1: is a symbolic link that cannot be followed"):
        parse_directory(folder)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("bad_file", "message"),
    [
        ("link_out", r"^migrations/002_b\.sql:1: is a symbolic link to \.\./elsewhere\.sql, out"),
        ("broken_link", r"^migrations/002_b\.sql:1: is a broken symbolic link"),
        ("long_version", r"^migrations/9{41}_b\.sql:1: the version prefix is longer than 40"),
    ],
)
def test_ops_import_of_a_bad_folder_says_why_and_imports_nothing(
    folder, tmp_path, bad_file, message
):
    import io

    from django.core.management import CommandError, call_command

    from migrations_ops.models import MigrationScript as MigrationScriptRow
    from tests.factories import TargetFactory

    TargetFactory(name="shop")
    (tmp_path / "elsewhere.sql").write_text("-- migrate:up\nDROP TABLE users;\n")
    write(folder, "001_a.sql", "-- migrate:up\nSELECT 1;\n")
    if bad_file == "long_version":
        write(folder, f"{'9' * 41}_b.sql", "-- migrate:up\nSELECT 2;\n")
    else:
        (folder / "002_b.sql").symlink_to(
            "../elsewhere.sql" if bad_file == "link_out" else "002_gone.sql"
        )

    with pytest.raises(CommandError, match=message):
        call_command(
            "ops",
            "import",
            "--target",
            "shop",
            "--dir",
            str(folder),
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
    assert not MigrationScriptRow.objects.exists()
