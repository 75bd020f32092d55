-- The policy gate (in the intake process, as the intake role): exigent clearances
-- flagged until a supervisor's review (services/intake/policy/reviews.py). An overdue
-- flag is claimed by one instance's watch (claimed_until) and reported once.
CREATE TABLE exigent_reviews (
  probe_id text PRIMARY KEY,
  due_at timestamptz,
  reviewed_at timestamptz,
  approved boolean,
  overdue_reported_at timestamptz,
  claimed_until timestamptz
);
CREATE INDEX exigent_reviews_due ON exigent_reviews (due_at)
  WHERE reviewed_at IS NULL AND overdue_reported_at IS NULL;
GRANT SELECT, INSERT, UPDATE, DELETE ON exigent_reviews TO intake;
