-- Partition leases (services/kit/fencing.py): the instance a consumer group assigns
-- partition p of a route's topics takes the lease of (group, p), bumping its epoch; the
-- writes that act on the world (dispatch's send claim and completion, the results
-- tracker's batch, the vault's purge claim) check in their own transaction that the epoch
-- is still theirs, so a stale owner (a zombie back from SIGSTOP) cannot act. One table per
-- service role, each granted to that role only (least privilege, as every store table).
CREATE TABLE dispatch_leases (
  group_id text NOT NULL,
  partition_no integer NOT NULL,
  epoch bigint NOT NULL,
  holder text NOT NULL,
  taken_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (group_id, partition_no)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON dispatch_leases TO dispatch;
CREATE TABLE results_leases (LIKE dispatch_leases INCLUDING ALL);
GRANT SELECT, INSERT, UPDATE, DELETE ON results_leases TO results;
CREATE TABLE intake_leases (LIKE dispatch_leases INCLUDING ALL);
GRANT SELECT, INSERT, UPDATE, DELETE ON intake_leases TO intake;
