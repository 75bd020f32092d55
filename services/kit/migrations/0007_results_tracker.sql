-- The results tracker (services/results/pg_store.py PgTracker): each probe's tracking
-- state, written once per consumed batch before its offsets commit. next_due is the
-- earliest open deadline not yet acted on: the deadline sweep of every instance claims
-- due rows FOR UPDATE SKIP LOCKED and records the deadlines it reported in acted.
CREATE TABLE tracker_probes (
  probe_id text PRIMARY KEY,
  state jsonb NOT NULL,
  next_due timestamptz,
  acted text[] NOT NULL DEFAULT '{}',
  review_pending boolean NOT NULL DEFAULT false,
  deletions_overdue integer NOT NULL DEFAULT 0
);
CREATE INDEX tracker_probes_next_due ON tracker_probes (next_due)
  WHERE next_due IS NOT NULL;
-- The gauges' counts (pending reviews, overdue receipts) read these, not every probe.
CREATE INDEX tracker_probes_review_pending ON tracker_probes (probe_id)
  WHERE review_pending;
CREATE INDEX tracker_probes_deletions_overdue ON tracker_probes (deletions_overdue)
  WHERE deletions_overdue > 0;
GRANT SELECT, INSERT, UPDATE, DELETE ON tracker_probes TO results;
