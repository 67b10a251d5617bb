"""A knockgate fleet: hosts sharing grants and security state through one Redis.

Off unless ``fleet:`` is configured; only then is redis-py imported. The daemon's loop
never waits on Redis: it hands messages and claims to :class:`~appliance.fleet.link.
FleetLink`, whose threads talk to the store and put typed items back on the loop's
queue::

    loop: verified open / close knock --publish--> link (writer thread) --> Redis
          (XADD to kg:{NAME}:events, live grants in kg:{NAME}:grants + :deadlines)
    Redis --XREAD BLOCK--> link (reader thread) --FleetApply--> loop: grant/revoke here
    loop: Vet of an SPA/TOTP/one-time knock --claim--> link (claimer thread):
          SET key NX PX ttl --FleetClaimed--> loop: the deferred vet finished
    link: reachable or not --FleetHealth--> loop (status, metrics, one log line)

On the first connect the reader reads the live grants (catch-up) and follows the
stream from its end; after an outage it reads on from its position (closes made
meanwhile), then the backlog is published; only a trimmed position reads the live
grants again (FleetReconcile: what is no longer live is closed). Everything read
back is decoded from bytes and checked in :mod:`.messages` before the loop sees it.

Modules: :mod:`.messages` (the messages, the items, the key layout: pure),
:mod:`.store` (the store protocol and an in-memory store for tests),
:mod:`.redis_store` (redis-py), :mod:`.link` (the threads).
"""
