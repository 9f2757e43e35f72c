-- Tollgate's config store. Portable SQL: the same file runs on PostgreSQL and SQLite.
-- Resources are JSON documents keyed by (kind, id) with a unique (kind, name); their
-- cross-references are checked by the control plane inside the write transaction, which every
-- writer serializes on the single config_revision row.

CREATE TABLE config_revision (
    id INTEGER PRIMARY KEY,
    revision BIGINT NOT NULL
);
INSERT INTO config_revision (id, revision) VALUES (1, 0);

CREATE TABLE objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision BIGINT NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, name)
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    consumer_id TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_keys_consumer ON api_keys (consumer_id);

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- One row per committed write: the audit log, and the change feed data planes catch up from.
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    name TEXT NOT NULL
);
