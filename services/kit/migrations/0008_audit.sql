-- The audit log (services/audit/pg_store.py): each leaf's bytes in its row, the tree's
-- right edge and the signed checkpoints; a batch's leaves, the tree row and the
-- invariants' state commit together. Digests and events only: leaves never hold image
-- bytes (services/audit/handlers.py replaces them by their digest).
CREATE TABLE audit_leaves (
  idx bigint PRIMARY KEY,
  topic text NOT NULL,
  partition integer NOT NULL,
  "offset" bigint NOT NULL,
  ce_id text,
  ce_type text,
  subject text,
  time text,
  leaf bytea NOT NULL,
  leaf_hash bytea NOT NULL,
  UNIQUE (topic, partition, "offset")
);
CREATE INDEX audit_leaves_subject ON audit_leaves (subject);
CREATE INDEX audit_leaves_ce_id ON audit_leaves (ce_id);
-- One row; an appender holds it locked for its whole batch, so appends are serialized.
CREATE TABLE audit_tree (
  id integer PRIMARY KEY CHECK (id = 0),
  size bigint NOT NULL,
  frontier bytea NOT NULL
);
CREATE TABLE audit_checkpoints (
  seq bigint PRIMARY KEY,
  tree_size bigint NOT NULL,
  root bytea NOT NULL,
  note text NOT NULL,
  created_at text NOT NULL
);
-- The invariants' state (services/audit/invariants.py, the same statements as on SQLite).
-- Times are ISO 8601 text compared as strings: byte order (COLLATE "C") whatever the
-- database's locale.
CREATE TABLE inv_cleared (
  probe_id text NOT NULL, provider_id text NOT NULL, fields text NOT NULL,
  PRIMARY KEY (probe_id, provider_id)
);
CREATE TABLE inv_dispatches (
  event_id text PRIMARY KEY, probe_id text NOT NULL, provider_id text NOT NULL,
  fields text NOT NULL, sent_at text COLLATE "C" NOT NULL,
  seen_at text COLLATE "C" NOT NULL, cleared integer NOT NULL DEFAULT 0
);
CREATE INDEX inv_dispatches_probe ON inv_dispatches (probe_id);
CREATE TABLE inv_purged (probe_id text PRIMARY KEY, purged_at text COLLATE "C" NOT NULL);
CREATE TABLE inv_probes (
  probe_id text PRIMARY KEY, expires_at text COLLATE "C" NOT NULL,
  flagged integer NOT NULL DEFAULT 0
);
CREATE TABLE inv_exigent (
  probe_id text PRIMARY KEY, due_at text COLLATE "C" NOT NULL,
  reviewed integer NOT NULL DEFAULT 0, flagged integer NOT NULL DEFAULT 0
);
CREATE TABLE inv_liveness (
  probe_id text NOT NULL, provider_id text NOT NULL, clearance_id text,
  cleared_due_at text COLLATE "C", dispatched_due_at text COLLATE "C", ended text,
  probe_ended integer NOT NULL DEFAULT 0, flagged integer NOT NULL DEFAULT 0,
  PRIMARY KEY (probe_id, provider_id)
);
CREATE INDEX inv_liveness_open ON inv_liveness (probe_id)
  WHERE clearance_id IS NOT NULL AND probe_ended = 0 AND flagged = 0;
CREATE TABLE inv_probe_ends (probe_id text PRIMARY KEY, how text NOT NULL);
CREATE TABLE inv_providers (
  provider_id text PRIMARY KEY, response_deadline_s integer NOT NULL
);
CREATE TABLE inv_trusted_keys (key_id text PRIMARY KEY, record text NOT NULL);
CREATE TABLE inv_provider_purposes (provider_id text PRIMARY KEY, purposes text NOT NULL);
CREATE TABLE inv_decisions_waiting (
  event_id text PRIMARY KEY, probe_id text NOT NULL, key_id text NOT NULL,
  decision_type text NOT NULL, decision text NOT NULL, seen_at text COLLATE "C" NOT NULL
);
CREATE INDEX inv_decisions_waiting_key ON inv_decisions_waiting (key_id);
CREATE TABLE inv_violations (
  offending_event_id text NOT NULL, invariant text NOT NULL, probe_id text NOT NULL,
  detected_at text NOT NULL, PRIMARY KEY (offending_event_id, invariant)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON audit_leaves, audit_tree, audit_checkpoints,
  inv_cleared, inv_dispatches, inv_purged, inv_probes, inv_exigent, inv_liveness,
  inv_probe_ends, inv_providers, inv_trusted_keys, inv_provider_purposes,
  inv_decisions_waiting, inv_violations TO audit;
-- The auditors' commands (frs audit verify, proof, replay, report) read the log, and the
-- schema version like every role; they change nothing.
GRANT SELECT ON schema_migrations, audit_leaves, audit_tree, audit_checkpoints TO auditor;
