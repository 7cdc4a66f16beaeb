-- harness: no-transaction
-- 004_backfill_staging.sql: backfills that must not hold long locks.
--
-- No transaction: the backfill procedure COMMITs after each batch, so each
-- batch holds its row locks for milliseconds and writers interleave freely.
-- Batches walk the primary key in ranges (no repeated scans for "rows still
-- NULL"), and skip rows already filled, so a rerun is cheap and changes nothing.

CREATE OR REPLACE PROCEDURE backfill_allocation_restaurant_ids(batch_size integer DEFAULT 5000)
LANGUAGE plpgsql AS $$
DECLARE
    next_id bigint;
    last_id bigint;
BEGIN
    SELECT min(id), max(id) INTO next_id, last_id FROM allocations;
    WHILE next_id IS NOT NULL AND next_id <= last_id LOOP
        PERFORM set_config('app.backfill', 'on', true);
        UPDATE allocations AS a
           SET restaurant_id = t.restaurant_id
          FROM dining_tables AS t
         WHERE a.id >= next_id AND a.id < next_id + batch_size
           AND a.restaurant_id IS NULL
           AND t.id = a.table_id;
        COMMIT;
        next_id := next_id + batch_size;
    END LOOP;
END
$$;

CALL backfill_allocation_restaurant_ids(5000);

-- Per-restaurant allocation reports. Built after the backfill, not before:
-- with no index on restaurant_id the backfill's updates stay HOT (no index
-- entry to write per row), which made this file several times faster.
CREATE INDEX CONCURRENTLY IF NOT EXISTS allocations_restaurant_idx
    ON allocations (restaurant_id);

-- With 001's orphans quarantined this succeeds; VALIDATE takes only a SHARE
-- UPDATE EXCLUSIVE lock, so bookings and allocations stay writable meanwhile.
ALTER TABLE allocations VALIDATE CONSTRAINT allocations_booking_id_fkey;

ANALYZE allocations;
ANALYZE bookings;
ANALYZE booking_slots;
ANALYZE table_hold_windows;
