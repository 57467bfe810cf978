"""The PostgreSQL store (`DATABASE_URL=postgresql://...`): the same parts as the SQLite one,
over a psycopg 3 connection pool, for one process or several replicas sharing a database."""
