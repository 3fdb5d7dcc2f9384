-- The database user of `delayq listen` (and status, inspect, check): only what it runs.
-- `delayq migrate` needs more (CREATE, ALTER, INDEX...): run it as the schema owner.
-- Replace shop (the database), delayq (the user) and the password. If you point delayq
-- at your own orders table (DELAYQ_ORDERS_TABLE), grant on that table instead.

-- MariaDB / MySQL ---------------------------------------------------------------------------
CREATE USER 'delayq'@'%' IDENTIFIED BY 'CHANGE-ME';
-- SELECT ... FOR UPDATE and UPDATE: a firing locks the order, then changes its status.
GRANT SELECT, UPDATE ON shop.orders TO 'delayq'@'%';
-- Narrower, if you prefer column grants (the columns delayq sets):
--   GRANT SELECT, UPDATE (status, cancelled_at, updated_at) ON shop.orders TO 'delayq'@'%';
-- One outcome row per firing, and the look-up that recognises a firing already recorded.
GRANT SELECT, INSERT ON shop.delayq_outcomes TO 'delayq'@'%';
-- The schema check (`delayq check`, and `delayq listen` at start) reads the revision.
GRANT SELECT ON shop.delayq_alembic_version TO 'delayq'@'%';
-- The outbox relay takes staged rows (SELECT ... FOR UPDATE) and deletes those relayed.
GRANT SELECT, DELETE ON shop.delayq_outbox TO 'delayq'@'%';
-- Your order service's own user stages timers in its transactions (connection=):
--   GRANT INSERT ON shop.delayq_outbox TO 'shop'@'%';

-- PostgreSQL (connected to the shop database) ------------------------------------------------
-- CREATE ROLE delayq LOGIN PASSWORD 'CHANGE-ME';
-- GRANT SELECT, UPDATE ON orders TO delayq;
-- GRANT SELECT, INSERT ON delayq_outcomes TO delayq;
-- The outcome id is a bigserial: an INSERT draws from its sequence.
-- GRANT USAGE ON SEQUENCE delayq_outcomes_id_seq TO delayq;
-- GRANT SELECT ON delayq_alembic_version TO delayq;
-- (SELECT ... FOR UPDATE needs UPDATE too on PostgreSQL; the relay updates no row.)
-- GRANT SELECT, UPDATE, DELETE ON delayq_outbox TO delayq;
-- Your order service's own role stages timers in its transactions (connection=):
--   GRANT INSERT ON delayq_outbox TO shop;
--   GRANT USAGE ON SEQUENCE delayq_outbox_id_seq TO shop;
-- (PUBLIC has CONNECT on the database and USAGE on schema public by default; if you
--  revoked them, grant them to delayq too.)
