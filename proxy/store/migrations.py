"""Versioned schema changes, applied in order at startup, each exactly once.

A migration is SQL both backends accept, or a pair keyed by dialect where they differ.
Never edit a released migration; add the next one.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str | dict[str, str]]] = [
    (
        1,
        """
        CREATE TABLE bp_keys (
            key_id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            token_hint TEXT NOT NULL,
            access_key_id TEXT NOT NULL UNIQUE,
            secret_enc TEXT NOT NULL,
            key_alias TEXT UNIQUE,
            user_id TEXT,
            team_id TEXT,
            spec TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX bp_keys_user ON bp_keys (user_id);
        CREATE INDEX bp_keys_team ON bp_keys (team_id);
        """,
    ),
]


def statements(migration: str | dict[str, str], dialect: str) -> list[str]:
    sql = migration if isinstance(migration, str) else migration[dialect]
    return [s.strip() for s in sql.split(";") if s.strip()]
