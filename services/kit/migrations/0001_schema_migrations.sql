-- Every service reads the schema version at start (services/kit/state.py) and refuses
-- to run on one it was not built for. The table itself is made by frs db migrate.
GRANT SELECT ON schema_migrations TO intake, dispatch, results, audit;
