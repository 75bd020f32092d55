"""The PostgreSQL schema, one file per step: ``NNNN_<name>.sql``, applied in order by
``frs db migrate`` as the owner role (services/kit/migrate.py). Each file grants every
table it makes to the one service role that owns it, and to nobody else."""
