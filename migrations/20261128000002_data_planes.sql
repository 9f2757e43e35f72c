-- Data planes seen by any control-plane replica, and their sync state. Not configuration:
-- writes here never bump the config revision.
CREATE TABLE data_planes (
    node_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    version TEXT NOT NULL,
    applied_revision BIGINT,
    applied_hash TEXT,
    state TEXT NOT NULL,
    error TEXT,
    last_seen BIGINT NOT NULL,
    connected_at BIGINT NOT NULL,
    control_plane TEXT NOT NULL
);
