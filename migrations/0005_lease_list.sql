-- Lists in pages (`GET /v1/leases?limit=N&continue=...`) walk leases in (name, id) order: an
-- index in that order (the rowid is the id) serves each page without sorting every lease.
CREATE INDEX lease_list ON lease (name);
