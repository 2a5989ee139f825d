-- The owner cap of a lease: RLIMIT_NPROC of the namespace's creator, which the kernel (>= 5.14)
-- applies to every process of the namespace. (pids_max, the cgroup cap, is in 0001.)
ALTER TABLE lease ADD COLUMN max_processes INTEGER CHECK (max_processes IS NULL OR max_processes > 0);
