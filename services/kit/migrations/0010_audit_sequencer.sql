-- One audit log, many audit instances (services/audit/sequencer.py), after Trillian's
-- split: every instance ingests what it consumes into audit_queue (cheap, idempotent);
-- the one instance holding audit_sequencer_lease moves queued entries into audit_leaves
-- in order, extends the tree, runs the invariants and signs checkpoints, each of its
-- transactions checking the lease's epoch first (a stale leader's batch fails).
CREATE TABLE audit_queue (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  topic text NOT NULL,
  partition integer NOT NULL,
  "offset" bigint NOT NULL,
  ce_id text,
  ce_type text,
  subject text,
  time text,
  -- The leaf's canonical JSON with its index left out at byte ``cut`` (the sequencer
  -- writes the index there); never image bytes (handlers.leaf_for keeps digests).
  leaf bytea NOT NULL,
  cut integer NOT NULL,
  -- Only for records the invariants read (handlers.ingest_entry): decoded again there.
  record bytea
);
-- Idempotent ingest: by CloudEvents id (per topic: a DLQ keeps the id of its record),
-- and by (topic, partition, offset) for records that are no CloudEvent.
CREATE UNIQUE INDEX audit_queue_position ON audit_queue (topic, partition, "offset");
CREATE UNIQUE INDEX audit_queue_ce_id ON audit_queue (topic, ce_id) WHERE ce_id IS NOT NULL;
-- One row: who sequences, under which epoch (bumped at every takeover), until when
-- (the database's clock, so hosts' clocks do not matter).
CREATE TABLE audit_sequencer_lease (
  id integer PRIMARY KEY CHECK (id = 0),
  holder text NOT NULL,
  epoch bigint NOT NULL,
  expires_at timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON audit_queue, audit_sequencer_lease TO audit;
-- frs status and the auditors see who leads; they change nothing.
GRANT SELECT ON audit_sequencer_lease TO auditor;
