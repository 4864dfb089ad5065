-- The shared Postgres of docker-compose.scale-out.yml, on its first start (docker-entrypoint-initdb.d):
-- Letta's schema migration needs pgvector but does not create it (the local stack does the same in
-- stack/postgres.py).
CREATE EXTENSION IF NOT EXISTS vector;
