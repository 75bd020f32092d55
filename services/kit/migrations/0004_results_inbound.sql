-- Results' inbound channels (services/results/pg_store.py): accepted webhook calls and
-- reply mails (replay refusal), and request_ref -> (probe, provider) of each send.
CREATE TABLE webhook_nonces (
  digest text PRIMARY KEY,
  seen_at double precision NOT NULL
);
CREATE INDEX webhook_nonces_seen_at ON webhook_nonces (seen_at);
CREATE TABLE mail_replies (
  digest text PRIMARY KEY,
  seen_at double precision NOT NULL
);
CREATE INDEX mail_replies_seen_at ON mail_replies (seen_at);
CREATE TABLE request_refs (
  request_ref text PRIMARY KEY,
  probe_id text NOT NULL,
  provider_id text NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_nonces, mail_replies, request_refs TO results;
