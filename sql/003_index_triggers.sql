-- harness: no-transaction
-- 003_index_triggers.sql: the indexes the booking paths need, and triggers.
--
-- No transaction: CREATE INDEX CONCURRENTLY cannot run inside one, and it is
-- what keeps writers going while an index builds on a large table. The runner
-- runs this file statement by statement in autocommit. Every statement is
-- idempotent, so a rerun after a failure finishes the job; a CONCURRENTLY
-- build that fails leaves an INVALID index, which the runner drops first.

-- The availability read: open slots of a restaurant in a time range.
CREATE INDEX CONCURRENTLY IF NOT EXISTS booking_slots_available_idx
    ON booking_slots (restaurant_id, starts_at)
    WHERE covers_booked < covers_total;

-- "My bookings", and the anonymizer's and support's customer look-ups.
CREATE INDEX CONCURRENTLY IF NOT EXISTS bookings_customer_idx
    ON bookings (customer_id);

-- The expired-hold sweep.
CREATE INDEX CONCURRENTLY IF NOT EXISTS table_hold_windows_expires_idx
    ON table_hold_windows (expires_at);

-- updated_at is kept right by the database, not by each code path. A backfill
-- sets app.backfill = 'on' for its transaction so that it does not make every
-- row look freshly edited.
CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('app.backfill', true), '') <> 'on' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER bookings_set_updated_at
    BEFORE UPDATE ON bookings
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE OR REPLACE TRIGGER allocations_set_updated_at
    BEFORE UPDATE ON allocations
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE OR REPLACE TRIGGER booking_slots_set_updated_at
    BEFORE UPDATE ON booking_slots
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE OR REPLACE TRIGGER table_hold_windows_set_updated_at
    BEFORE UPDATE ON table_hold_windows
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- An expired hold must never block anyone: before a new hold is inserted, the
-- expired holds of the same table that it overlaps are deleted in the same
-- transaction, so table_hold_windows_no_overlap only ever sees live holds.
-- purge_expired_holds() below is the periodic sweep for the rest.
CREATE OR REPLACE FUNCTION purge_expired_holds_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM table_hold_windows AS h
     WHERE h.table_id = NEW.table_id
       AND h.during && NEW.during
       AND h.expires_at <= now();
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER table_hold_windows_purge_expired
    BEFORE INSERT ON table_hold_windows
    FOR EACH ROW EXECUTE FUNCTION purge_expired_holds_before_insert();

CREATE OR REPLACE FUNCTION purge_expired_holds() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    purged integer;
BEGIN
    DELETE FROM table_hold_windows WHERE expires_at <= now();
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
$$;

-- allocations.restaurant_id follows the table, whatever code path writes it.
CREATE OR REPLACE FUNCTION allocations_fill_restaurant_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT t.restaurant_id INTO NEW.restaurant_id
      FROM dining_tables AS t
     WHERE t.id = NEW.table_id;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER allocations_set_restaurant_id
    BEFORE INSERT OR UPDATE OF table_id ON allocations
    FOR EACH ROW EXECUTE FUNCTION allocations_fill_restaurant_id();
