-- Intake: the one outcome each request id ended in, and refusals of a reused id
-- (services/intake/outcomes.py). Digests and events only, no image bytes.
CREATE TABLE request_outcomes (
  request_id text PRIMARY KEY,
  probe_id text NOT NULL,
  event_type text NOT NULL,
  event_json text NOT NULL,
  content_sha256 text,
  record_sha256 text
);
CREATE TABLE request_reuses (
  request_id text NOT NULL,
  content_sha256 text NOT NULL,
  event_json text NOT NULL,
  PRIMARY KEY (request_id, content_sha256)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON request_outcomes, request_reuses TO intake;
