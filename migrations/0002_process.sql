-- Processes started in a lease's user namespace. Rows outlive their process (exit status stays
-- readable) until the lease is released, when they are deleted with it.
CREATE TABLE process (
    id          TEXT    PRIMARY KEY NOT NULL,
    lease_id    INTEGER NOT NULL REFERENCES lease (id),
    lease_name  TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,     -- /proc/PID/stat starttime: with pid and boot_id, identity
    boot_id     TEXT    NOT NULL,
    host_uid    INTEGER NOT NULL,
    host_gid    INTEGER NOT NULL,
    argv        TEXT    NOT NULL,     -- JSON array of strings
    state       TEXT    NOT NULL CHECK (state IN ('running', 'exited', 'lost')),
    exit_code   INTEGER,
    signal      INTEGER,
    started_at  INTEGER NOT NULL,     -- unix milliseconds
    ended_at    INTEGER,
    CHECK ((state = 'running') = (ended_at IS NULL))
) STRICT;
CREATE INDEX process_lease ON process (lease_id, started_at);
CREATE INDEX process_running ON process (state) WHERE state = 'running';
