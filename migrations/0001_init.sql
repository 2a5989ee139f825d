-- subidd schema, version 1. Never edit once landed: add a new numbered file instead.

-- The pool's block size is fixed once blocks exist: changing it would re-cut existing ranges.
CREATE TABLE pool_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE lease (
    id             INTEGER PRIMARY KEY,
    name           TEXT    NOT NULL,
    uid_base       INTEGER NOT NULL CHECK (uid_base BETWEEN 65536 AND 4294967294),
    gid_base       INTEGER NOT NULL CHECK (gid_base BETWEEN 65536 AND 4294967294),
    size           INTEGER NOT NULL CHECK (size > 0 AND uid_base + size <= 4294967295 AND gid_base + size <= 4294967295),
    state          TEXT    NOT NULL CHECK (state IN ('active', 'released')),
    labels         TEXT    NOT NULL DEFAULT '{}',
    ttl_seconds    INTEGER CHECK (ttl_seconds IS NULL OR ttl_seconds > 0),
    created_at     INTEGER NOT NULL,  -- unix milliseconds
    expires_at     INTEGER,           -- unix milliseconds, NULL without a ttl
    released_at    INTEGER,           -- unix milliseconds, NULL while active
    created_by     INTEGER,           -- caller uid
    -- per-lease spawn settings, filled in by later versions (NULL = not set)
    pids_max       INTEGER,
    rlimits        TEXT,
    namespaces     TEXT,
    CHECK ((state = 'active') = (released_at IS NULL))
) STRICT;

-- At most one active lease per name; released ones are kept as history.
CREATE UNIQUE INDEX lease_active_name ON lease (name) WHERE state = 'active';
CREATE INDEX lease_name ON lease (name, released_at);
CREATE INDEX lease_expiry ON lease (expires_at) WHERE state = 'active' AND expires_at IS NOT NULL;

-- One row per block that was ever handed out, keyed by its first host id. The primary key is what
-- makes two holders of one id impossible, whatever the code above it does. A lease of N blocks
-- holds N rows. A free block keeps its row with the time it was released (0 = purged), which is
-- what quarantine and "least recently released first" read back after a restart.
CREATE TABLE block (
    start       INTEGER PRIMARY KEY NOT NULL,
    lease_id    INTEGER REFERENCES lease (id),
    released_at INTEGER,
    CHECK ((lease_id IS NULL) <> (released_at IS NULL))
) STRICT;
CREATE INDEX block_lease ON block (lease_id) WHERE lease_id IS NOT NULL;

-- History: every create, renew, release, expiry and purge, with time and caller.
CREATE TABLE event (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('create', 'renew', 'release', 'expire', 'purge')),
    lease_id    INTEGER NOT NULL REFERENCES lease (id),
    lease_name  TEXT    NOT NULL,
    caller_uid  INTEGER,
    detail      TEXT
) STRICT;
CREATE INDEX event_lease ON event (lease_id);
