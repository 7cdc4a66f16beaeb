"""Locust booking load: parallel creates and holds at the same table and time.

    locust -f loadtests/bookings.py                      # web UI on :8089
    locust -f loadtests/bookings.py --headless -u 20 -t 30s --mode lax --phase pre
    locust -f loadtests/bookings.py --master  /  --worker --master-host HOST
    locust -f loadtests/bookings.py --headless --processes 4 -u 40 -t 1m

Target: --db-url (or $HARNESS_DB_URL), else $SUPABASE_DB_URL, else
$DATABASE_URL, else the harness's embedded PostgreSQL (started, baseline
applied and provisioned small on first use). Workers use the target their
master resolved (it travels in Locust's spawn message), so only the master
needs to be told; an embedded target listens on a local socket, so with
workers on other machines give the master a --db-url they can all reach.

The knobs: --db-url, --mode lax|strict|auto, --phase LABEL, --hot-tables N,
--hot-windows N, --hot-fraction F, --retry-fraction F, --think-time SECONDS,
--weights OP=N,..., --hold-ttl SECONDS, --run-dir DIR; each also has a
HARNESS_* environment variable, and all but --db-url show in the web UI.
(`locust --help` does not list a locustfile's own options: Locust prints its
help before it imports the locustfile, locust issue #2917; `harness load
--help` describes the same knobs.)

Every request is a sample in <run-dir>/samples-<phase>.parquet, written by the
master (or the single process) when the test stops and again when Locust
quits. The users and their transactions live in harness/load.py, shared with
`harness load`.
"""

# Locust first: its gevent monkey-patching must precede every other import.
import locust  # noqa: I001
from locust import events

from harness.load import BookingUser, add_options, attach

__all__ = ["BookingUser"]

events.init_command_line_parser.add_listener(add_options)


@events.init.add_listener
def _on_init(environment: locust.env.Environment, **_kwargs: object) -> None:
    attach(environment)
