-- 002_integrity.sql: the strict constraints.
--
-- After 001 no row violates any of these. Runs in one transaction: either
-- every constraint is there, or none is.
--
-- Locks: ADD CONSTRAINT ... EXCLUDE cannot be added NOT VALID in PostgreSQL;
-- it takes an ACCESS EXCLUSIVE lock on its table while it checks every row.
-- That is why the runbook pauses writers for this file, and what
-- `harness rehearse --online` measures when they are not paused.
--
-- PostgreSQL has no ADD CONSTRAINT IF NOT EXISTS, so each constraint is added
-- inside a DO block that first looks it up: a second run changes nothing.

-- Writers that were not paused may have written new blockers since 001 (a
-- double booking, a retried idempotency key). So first lock them out of the
-- tables this file constrains, then run 001's rules again: from here to COMMIT
-- nothing new can arrive. ACCESS EXCLUSIVE at once, because the ALTER TABLEs
-- below need it anyway: taking a weaker lock first and upgrading later
-- deadlocked with every app transaction that had read a table and then wanted
-- to write it. The order is the one the app's transactions mostly take (a hold
-- before its booking, a booking before its allocation and slot); a deadlock
-- that remains is retried by the runner (--retries).
LOCK TABLE table_hold_windows, bookings, allocations, booking_slots, table_inventory
    IN ACCESS EXCLUSIVE MODE;

SELECT harness.quarantine_blockers();

-- NOT NULLs (001 quarantined the NULL rows).
ALTER TABLE bookings ALTER COLUMN party_size SET NOT NULL;
ALTER TABLE table_hold_windows ALTER COLUMN expires_at SET NOT NULL;

-- The restaurant of an allocation, denormalised for per-restaurant reports:
-- filled by a trigger from 003 on, backfilled in batches by 004. Nullable and
-- without a default, so adding it does not rewrite the table.
ALTER TABLE allocations ADD COLUMN IF NOT EXISTS restaurant_id bigint;

-- CHECKs.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'bookings'::regclass
                      AND conname = 'bookings_party_size_check') THEN
        ALTER TABLE bookings
            ADD CONSTRAINT bookings_party_size_check CHECK (party_size BETWEEN 1 AND 100);
    END IF;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'bookings'::regclass
                      AND conname = 'bookings_status_check') THEN
        ALTER TABLE bookings
            ADD CONSTRAINT bookings_status_check CHECK (status IN (
                'pending', 'confirmed', 'seated', 'completed', 'cancelled', 'no_show'));
    END IF;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'allocations'::regclass
                      AND conname = 'allocations_during_check') THEN
        ALTER TABLE allocations
            ADD CONSTRAINT allocations_during_check
            CHECK (NOT isempty(during) AND NOT lower_inf(during) AND NOT upper_inf(during));
    END IF;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'table_hold_windows'::regclass
                      AND conname = 'table_hold_windows_during_check') THEN
        ALTER TABLE table_hold_windows
            ADD CONSTRAINT table_hold_windows_during_check
            CHECK (NOT isempty(during) AND NOT lower_inf(during) AND NOT upper_inf(during));
    END IF;
END $$;

-- Unique keys. The idempotency key makes a client retry of "create booking"
-- fail with 23505 instead of creating the booking twice.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'bookings'::regclass
                      AND conname = 'bookings_idempotency_key_key') THEN
        ALTER TABLE bookings
            ADD CONSTRAINT bookings_idempotency_key_key UNIQUE (idempotency_key);
    END IF;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'booking_slots'::regclass
                      AND conname = 'booking_slots_restaurant_starts_key') THEN
        ALTER TABLE booking_slots
            ADD CONSTRAINT booking_slots_restaurant_starts_key UNIQUE (restaurant_id, starts_at);
    END IF;
END $$;

-- The composite FK's target: (id, restaurant_id) is unique because id is.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'dining_tables'::regclass
                      AND conname = 'dining_tables_id_restaurant_key') THEN
        ALTER TABLE dining_tables
            ADD CONSTRAINT dining_tables_id_restaurant_key UNIQUE (id, restaurant_id);
    END IF;
END $$;

-- Inventory can only name a table of its own restaurant. Added NOT VALID so it
-- checks new rows at once without scanning (and locking) the existing ones;
-- `harness validate --validate-fks` validates it later under a weaker lock.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'table_inventory'::regclass
                      AND conname = 'table_inventory_table_restaurant_fkey') THEN
        ALTER TABLE table_inventory
            ADD CONSTRAINT table_inventory_table_restaurant_fkey
            FOREIGN KEY (table_id, restaurant_id)
            REFERENCES dining_tables (id, restaurant_id) NOT VALID;
    END IF;
END $$;

-- Allocations belong to a booking; 004 validates it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'allocations'::regclass
                      AND conname = 'allocations_booking_id_fkey') THEN
        ALTER TABLE allocations
            ADD CONSTRAINT allocations_booking_id_fkey
            FOREIGN KEY (booking_id) REFERENCES bookings (id) ON DELETE CASCADE NOT VALID;
    END IF;
END $$;

-- No table allocated twice for overlapping times, and no table held twice.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'allocations'::regclass
                      AND conname = 'allocations_no_overlap') THEN
        ALTER TABLE allocations
            ADD CONSTRAINT allocations_no_overlap
            EXCLUDE USING gist (table_id WITH =, during WITH &&);
    END IF;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'table_hold_windows'::regclass
                      AND conname = 'table_hold_windows_no_overlap') THEN
        ALTER TABLE table_hold_windows
            ADD CONSTRAINT table_hold_windows_no_overlap
            EXCLUDE USING gist (table_id WITH =, during WITH &&);
    END IF;
END $$;
