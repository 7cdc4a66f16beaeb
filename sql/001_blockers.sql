-- 001_blockers.sql: clear the way for the strict constraints of 002.
--
-- Every row that would make a constraint of 002 fail is MOVED into
-- harness.quarantine with the reason it was moved (its full row as jsonb);
-- nothing is deleted outright, so support can restore or fix each one.
-- Also creates what later files need: the btree_gist extension (exclusion
-- constraints over bigint = and tstzrange &&) and the harness schema.
--
-- Idempotent: a second run finds nothing left to move and changes nothing.
-- Runs in one transaction (the runner's); the rules run in a fixed order and
-- a row is quarantined under the first reason that applies to it.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE SCHEMA IF NOT EXISTS harness;

CREATE TABLE IF NOT EXISTS harness.quarantine (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table    text NOT NULL,
    source_id       bigint NOT NULL,
    reason          text NOT NULL,
    row_data        jsonb NOT NULL,
    quarantined_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS quarantine_source_reason_idx
    ON harness.quarantine (source_table, reason);

-- Bookings that block 002 (NOT NULL party_size, the party-size and status
-- CHECKs, the unique idempotency key), first matching reason per booking.
-- A function so that the two statements below agree on the same set.
CREATE OR REPLACE FUNCTION harness.booking_blockers()
RETURNS TABLE (booking_id bigint, reason text)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT ON (r.id) r.id, r.reason
    FROM (
        SELECT id, 'null_party_size' AS reason, 1 AS rank
          FROM public.bookings WHERE party_size IS NULL
        UNION ALL
        SELECT id, 'invalid_party_size', 2
          FROM public.bookings WHERE party_size NOT BETWEEN 1 AND 100
        UNION ALL
        SELECT id, 'invalid_status', 3
          FROM public.bookings
         WHERE status NOT IN ('pending', 'confirmed', 'seated', 'completed',
                              'cancelled', 'no_show')
        UNION ALL
        SELECT id, 'duplicate_idempotency_key', 4
          FROM (SELECT id, row_number() OVER (PARTITION BY idempotency_key
                                              ORDER BY id) AS nth
                  FROM public.bookings
                 WHERE idempotency_key IS NOT NULL) AS keyed
         WHERE nth > 1
    ) AS r
    ORDER BY r.id, r.rank
$$;

-- Every rule, in order, as one function: 001 runs it once over the snapshot,
-- and 002 runs it again while it holds its locks, so that rows written by
-- writers that were not paused between 001 and 002 cannot make 002 fail.
-- Returns how many rows it moved (repointed bookings included).
CREATE OR REPLACE FUNCTION harness.quarantine_blockers() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    step bigint;
BEGIN
    -- The allocations of those bookings go first, under their own reason, so that
    -- the orphan rule below does not count them.
    WITH moved AS (
        DELETE FROM allocations AS a
         USING harness.booking_blockers() AS b
         WHERE a.booking_id = b.booking_id
        RETURNING a.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'allocations', m.id, 'booking_quarantined', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    WITH moved AS (
        DELETE FROM bookings AS bk
         USING harness.booking_blockers() AS b
         WHERE bk.id = b.booking_id
        RETURNING bk.*, b.reason AS quarantine_reason
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'bookings', m.id, m.quarantine_reason, to_jsonb(m) - 'quarantine_reason'
      FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Allocations whose booking does not exist (002 adds the FK).
    WITH moved AS (
        DELETE FROM allocations AS a
         WHERE NOT EXISTS (SELECT 1 FROM bookings AS b WHERE b.id = a.booking_id)
        RETURNING a.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'allocations', m.id, 'orphan_allocation', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Empty or unbounded ranges (002's CHECKs).
    WITH moved AS (
        DELETE FROM allocations
         WHERE isempty(during) OR lower_inf(during) OR upper_inf(during)
        RETURNING *
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'allocations', m.id, 'invalid_during', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Double bookings: an allocation that overlaps an allocation of the same table
    -- with a lower id goes (the first booking made keeps its table). Each row is
    -- compared with the other rows of its table only (allocations_table_idx).
    -- No helper index on purpose: building and dropping one takes SHARE and ACCESS
    -- EXCLUSIVE locks on allocations, and with writers still going (a rehearsal
    -- with --online) the drop deadlocked with them behind this file's row locks.
    WITH moved AS (
        DELETE FROM allocations AS a
         WHERE EXISTS (SELECT 1 FROM allocations AS b
                        WHERE b.table_id = a.table_id
                          AND b.during && a.during
                          AND b.id < a.id)
        RETURNING a.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'allocations', m.id, 'overlapping_allocation', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Holds. Expired ones first: they no longer hold anything, and must not be
    -- counted as overlaps (from 003 on, a trigger deletes them on contact).
    WITH moved AS (
        DELETE FROM table_hold_windows WHERE expires_at < now() RETURNING *
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'table_hold_windows', m.id, 'expired_hold', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    WITH moved AS (
        DELETE FROM table_hold_windows WHERE expires_at IS NULL RETURNING *
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'table_hold_windows', m.id, 'null_hold_expiry', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    WITH moved AS (
        DELETE FROM table_hold_windows
         WHERE isempty(during) OR lower_inf(during) OR upper_inf(during)
        RETURNING *
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'table_hold_windows', m.id, 'invalid_during', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    WITH moved AS (
        DELETE FROM table_hold_windows AS h
         WHERE EXISTS (SELECT 1 FROM table_hold_windows AS o
                        WHERE o.table_id = h.table_id
                          AND o.during && h.during
                          AND o.id < h.id)
        RETURNING h.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'table_hold_windows', m.id, 'overlapping_hold', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Inventory rows naming a table of another restaurant (002's composite FK).
    WITH moved AS (
        DELETE FROM table_inventory AS ti
         USING dining_tables AS dt
         WHERE dt.id = ti.table_id AND dt.restaurant_id <> ti.restaurant_id
        RETURNING ti.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'table_inventory', m.id, 'inventory_table_other_restaurant', to_jsonb(m)
      FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    -- Duplicate slots (002's unique key): bookings move to the slot that stays.
    WITH keeper AS (
        SELECT id, min(id) OVER (PARTITION BY restaurant_id, starts_at) AS keep_id
          FROM booking_slots
    )
    UPDATE bookings AS b
       SET slot_id = k.keep_id
      FROM keeper AS k
     WHERE b.slot_id = k.id AND k.id <> k.keep_id;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    WITH moved AS (
        DELETE FROM booking_slots AS s
         WHERE EXISTS (SELECT 1 FROM booking_slots AS o
                        WHERE o.restaurant_id = s.restaurant_id
                          AND o.starts_at = s.starts_at
                          AND o.id < s.id)
        RETURNING s.*
    )
    INSERT INTO harness.quarantine (source_table, source_id, reason, row_data)
    SELECT 'booking_slots', m.id, 'duplicate_slot', to_jsonb(m) FROM moved AS m;
    GET DIAGNOSTICS step = ROW_COUNT;
    total := total + step;

    RETURN total;
END
$$;

SELECT harness.quarantine_blockers();
