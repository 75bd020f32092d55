-- Dispatch's ledger (services/dispatch/pg_ledger.py): one row per (probe, provider) send,
-- claimed before it goes out and completed with the events it produced, so a send happens
-- once across redelivery, restart and instances. owner and heartbeat_at fence the claim
-- (a takeover is a compare-and-swap on both). outcome is the events as JSON text, no image.
CREATE TABLE sends (
  probe_id text NOT NULL,
  provider_id text NOT NULL,
  dispatch_id text NOT NULL,
  request_ref text NOT NULL,
  state text NOT NULL CHECK (state IN ('claimed', 'done')),
  attempts integer NOT NULL DEFAULT 0,
  claimed_at timestamptz NOT NULL,
  finished_at timestamptz,
  outcome text,
  owner text NOT NULL DEFAULT '',
  heartbeat_at timestamptz,
  PRIMARY KEY (probe_id, provider_id)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON sends TO dispatch;
