"""Versioned schema changes, applied in order at startup, each exactly once.

A migration is SQL both backends accept, or a pair keyed by dialect where they differ.
Never edit a released migration; add the next one.
"""

from __future__ import annotations

# A migration: SQL statements separated by ";", or a list of statements (a trigger's body
# holds semicolons), or either of those per dialect.
Migration = str | list[str] | dict[str, str | list[str]]

MIGRATIONS: list[tuple[int, Migration]] = [
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
    (
        2,
        """
        CREATE TABLE bp_spend (
            request_id TEXT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            day TEXT NOT NULL,
            key_id TEXT,
            key_alias TEXT,
            user_id TEXT,
            team_id TEXT,
            end_user TEXT,
            operation TEXT NOT NULL,
            service TEXT NOT NULL,
            model TEXT,
            status INTEGER NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            total_tokens BIGINT NOT NULL,
            cost DOUBLE PRECISION,
            incomplete INTEGER NOT NULL,
            use_case TEXT,
            annotations TEXT,
            error TEXT
        );
        CREATE INDEX bp_spend_ts ON bp_spend (ts);
        CREATE INDEX bp_spend_key_ts ON bp_spend (key_id, ts);
        CREATE INDEX bp_spend_user_ts ON bp_spend (user_id, ts);
        CREATE INDEX bp_spend_team_ts ON bp_spend (team_id, ts);
        CREATE TABLE bp_spend_labels (
            request_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            cost DOUBLE PRECISION,
            total_tokens BIGINT NOT NULL
        );
        CREATE INDEX bp_spend_labels_kv ON bp_spend_labels (kind, value, ts);
        CREATE TABLE bp_limits (
            limit_id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
    (
        3,
        """
        CREATE TABLE bp_jobs (
            job_arn TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX bp_jobs_id ON bp_jobs (job_id);
        CREATE INDEX bp_jobs_key ON bp_jobs (key_id);
        """,
    ),
    (
        4,
        # 1 when the tokens (and so the cost) are an estimate: a stream that ended before
        # its usage arrived is charged for what it consumed, not left free.
        # model_ref: the ARN a request named when it was resolved to the model it runs.
        # A batch job's output URI and region, and when its tokens were charged.
        """
        ALTER TABLE bp_spend ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE bp_spend ADD COLUMN model_ref TEXT;
        ALTER TABLE bp_jobs ADD COLUMN output_uri TEXT;
        ALTER TABLE bp_jobs ADD COLUMN region TEXT;
        ALTER TABLE bp_jobs ADD COLUMN settled_at DOUBLE PRECISION
        """,
    ),
    (
        5,
        # Upstream routing: the account and region that served a request, and the pool a
        # team's keys use when they name none themselves.
        """
        ALTER TABLE bp_spend ADD COLUMN account TEXT;
        ALTER TABLE bp_spend ADD COLUMN region TEXT;
        CREATE TABLE bp_teams (
            team_id TEXT PRIMARY KEY,
            upstream TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        6,
        # Console sessions, by the SHA-256 of their cookie (never the cookie itself), so
        # replicas sharing the database share them.
        """
        CREATE TABLE bp_console_sessions (
            session_hash TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            key_id TEXT,
            csrf TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX bp_console_sessions_key ON bp_console_sessions (key_id);
        CREATE INDEX bp_console_sessions_expiry ON bp_console_sessions (expires_at)
        """,
    ),
    (
        7,
        # Most keys belong to no user or team: their ledger rows need no entry in the user
        # and team indexes (every row was five B-tree inserts; the ledger writer's CPU is
        # most of it). ``user_id = $1`` implies ``user_id IS NOT NULL``, so both SQLite's
        # and PostgreSQL's planners still use these indexes for budgets and filters.
        """
        DROP INDEX bp_spend_user_ts;
        CREATE INDEX bp_spend_user_ts ON bp_spend (user_id, ts) WHERE user_id IS NOT NULL;
        DROP INDEX bp_spend_team_ts;
        CREATE INDEX bp_spend_team_ts ON bp_spend (team_id, ts) WHERE team_id IS NOT NULL
        """,
    ),
    (
        8,
        # A console session is bound to the credential it was opened with (an HMAC of the
        # session id under the master key, or under the key's token hash): rotating the
        # master key or regenerating a key ends its sessions. Older sessions have none,
        # and end.
        "ALTER TABLE bp_console_sessions ADD COLUMN credential TEXT",
    ),
    (
        9,
        # AgentCore sessions (a runtime's, a code interpreter's, a browser's, a memory's
        # actor's) belong to the key that started them, as jobs do.
        """
        CREATE TABLE bp_owned_sessions (
            session_ref TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX bp_owned_sessions_key ON bp_owned_sessions (key_id)
        """,
    ),
    (
        10,
        # Where owned state lives when it lives in one account (a stored response): the
        # pool member ("account/region") that holds it.
        "ALTER TABLE bp_owned_sessions ADD COLUMN location TEXT",
    ),
    (
        11,
        # The audit log: append-only, each row chained to the one before by its hash
        # (``audit``); rows are only ever inserted, and deleted by retention, oldest first.
        """
        CREATE TABLE bp_audit (
            seq BIGINT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            actor_kind TEXT NOT NULL,
            email TEXT,
            source TEXT,
            request_id TEXT,
            action TEXT NOT NULL,
            target TEXT,
            before TEXT,
            after TEXT,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX bp_audit_ts ON bp_audit (ts)
        """,
    ),
    (
        12,
        {
            "sqlite": [
                "CREATE TRIGGER bp_audit_append_only BEFORE UPDATE ON bp_audit"
                " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
            ],
            "postgres": [
                "CREATE FUNCTION bp_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS"
                " $f$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $f$",
                "CREATE TRIGGER bp_audit_append_only BEFORE UPDATE ON bp_audit"
                " FOR EACH ROW EXECUTE FUNCTION bp_audit_append_only()",
            ],
        },
    ),
    (
        13,
        # Admin API tokens (automation: CI, Terraform), stored as the SHA-256 of the token;
        # console sessions opened by single sign-on carry the user's role and teams.
        """
        CREATE TABLE bp_admin_tokens (
            token_id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            team_id TEXT,
            expires_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            created_by TEXT NOT NULL,
            revoked_at DOUBLE PRECISION
        );
        ALTER TABLE bp_console_sessions ADD COLUMN role TEXT;
        ALTER TABLE bp_console_sessions ADD COLUMN teams TEXT;
        ALTER TABLE bp_console_sessions ADD COLUMN email TEXT
        """,
    ),
    (
        14,
        # Teams and users as records: a team's settings and policy (one JSON document),
        # users with their spend cap, and who belongs to which team.
        """
        ALTER TABLE bp_teams ADD COLUMN spec TEXT;
        CREATE TABLE bp_users (
            user_id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE bp_team_members (
            team_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            role TEXT NOT NULL,
            PRIMARY KEY (team_id, user_id)
        );
        CREATE INDEX bp_team_members_user ON bp_team_members (user_id)
        """,
    ),
    (
        15,
        # A developer machine's token (``bedrock-proxy login``) is its user's: their email
        # and teams, for the short-lived keys it asks for.
        """
        ALTER TABLE bp_admin_tokens ADD COLUMN email TEXT;
        ALTER TABLE bp_admin_tokens ADD COLUMN teams TEXT
        """,
    ),
    (
        16,
        # ...and the identity provider's refresh token for it (sealed with the server's
        # secret), with which the user's groups are asked again while the token lives.
        """
        ALTER TABLE bp_admin_tokens ADD COLUMN refresh TEXT;
        ALTER TABLE bp_admin_tokens ADD COLUMN checked_at DOUBLE PRECISION
        """,
    ),
    (
        17,
        # Where a membership came from: the identity provider's groups ("groups"), which
        # take it away again when they no longer name the team, or by hand (null).
        """
        ALTER TABLE bp_team_members ADD COLUMN source TEXT
        """,
    ),
]


def statements(migration: Migration, dialect: str) -> list[str]:
    sql = migration[dialect] if isinstance(migration, dict) else migration
    if isinstance(sql, list):
        return sql
    return [s.strip() for s in sql.split(";") if s.strip()]
