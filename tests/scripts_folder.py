"""Migrations folders for tests, written the way applications keep them (dbmate layout)."""

from pathlib import Path

# The books that TargetDB.create_runbook_books() leaves, with their SQL.
USERS = (
    "001_create_users.sql",
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);",
    "DROP TABLE users;",
)
EMAIL = (
    "002_add_email.sql",
    "ALTER TABLE users ADD COLUMN email TEXT;",
    "ALTER TABLE users DROP COLUMN email;",
)
ORDERS = (
    "003_create_orders.sql",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER);\n"
    "CREATE INDEX orders_user ON orders (user_id);",
    "DROP INDEX orders_user;\nDROP TABLE orders;",
)


def write_folder(path: Path, *migrations: tuple[str, str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.sql"):
        old.unlink()
    for filename, up, down in migrations:
        text = f"-- migrate:up\n{up}\n"
        if down is not None:
            text += f"\n-- migrate:down\n{down}\n"
        (path / filename).write_text(text)
    return path


def apply_directly(target, *migrations: tuple[str, str, str]) -> None:
    """Run the up SQL the way the application's own migrator did (the books already say so)."""
    for _, up, _ in migrations:
        for statement in up.split(";"):
            if statement.strip():
                target.execute(statement)
