-- The vault index (services/vault/pg_index.py): where each object is, its expiry, its
-- purge state and its wrapped data key, the only copy of it. The key is wrapped under an
-- epoch key kept outside the database, so what this table leaves in WAL, dead tuples and
-- dumps after a purge is noise once the epoch is destroyed (docs/security.md). Intake
-- puts and purges; dispatch only reads (it unwraps keys to open the images it sends).
CREATE TABLE vault_objects (
  ref text PRIMARY KEY,
  probe_id text NOT NULL,
  case_id text NOT NULL,
  kind text NOT NULL,
  object_name text NOT NULL,
  kek_id text NOT NULL,
  wrapped_key bytea,
  created_at timestamptz NOT NULL,
  expires_at timestamptz NOT NULL,
  state text NOT NULL CHECK (state IN ('stored', 'purging', 'purged', 'announced')),
  purge_reason text,
  purged_at timestamptz
);
CREATE INDEX vault_due ON vault_objects (state, expires_at);
CREATE INDEX vault_case ON vault_objects (case_id, state);
GRANT SELECT, INSERT, UPDATE, DELETE ON vault_objects TO intake;
GRANT SELECT ON vault_objects TO dispatch;
