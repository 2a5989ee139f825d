-- The event feed (`GET /v1/events`): process starts and ends join the history, and event ids
-- never go back (AUTOINCREMENT), so `?since=<id>` is a safe resume point.
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt, ids kept.
CREATE TABLE event_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('create', 'renew', 'release', 'expire', 'purge',
                                                 'process_start', 'process_exit', 'process_lost')),
    lease_id    INTEGER NOT NULL REFERENCES lease (id),
    lease_name  TEXT    NOT NULL,
    caller_uid  INTEGER,
    detail      TEXT                -- JSON object, or NULL
) STRICT;
INSERT INTO event_new (id, at, kind, lease_id, lease_name, caller_uid, detail)
    SELECT id, at, kind, lease_id, lease_name, caller_uid, detail FROM event ORDER BY id;
DROP TABLE event;
ALTER TABLE event_new RENAME TO event;
CREATE INDEX event_lease ON event (lease_id);
CREATE INDEX event_name ON event (lease_name, id);

-- Process events are written by the database itself, in the statement that records the
-- process: no extra round trip on the spawn path, and no process row without its event.
CREATE TRIGGER process_started AFTER INSERT ON process
BEGIN
    INSERT INTO event (at, kind, lease_id, lease_name, caller_uid, detail)
    VALUES (NEW.started_at, 'process_start', NEW.lease_id, NEW.lease_name, NULL,
            json_object('process', NEW.id, 'pid', NEW.pid,
                        'host_uid', NEW.host_uid, 'host_gid', NEW.host_gid));
END;

CREATE TRIGGER process_ended AFTER UPDATE OF state ON process
WHEN OLD.state = 'running' AND NEW.state <> 'running'
BEGIN
    INSERT INTO event (at, kind, lease_id, lease_name, caller_uid, detail)
    VALUES (NEW.ended_at,
            CASE NEW.state WHEN 'lost' THEN 'process_lost' ELSE 'process_exit' END,
            NEW.lease_id, NEW.lease_name, NULL,
            json_object('process', NEW.id, 'pid', NEW.pid, 'state', NEW.state,
                        'exit_code', NEW.exit_code, 'signal', NEW.signal));
END;
