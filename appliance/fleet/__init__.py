"""A knockgate fleet: hosts sharing grants and security state through one Redis.

Off unless ``fleet:`` is configured; only then is redis-py imported. The daemon's loop
never waits on Redis: it hands messages and claims to :class:`~appliance.fleet.link.
FleetLink`, whose threads talk to the store and put typed items back on the loop's
queue::

    loop: verified open / close knock --publish--> link (writer thread) --> Redis
          (XADD to kg:{NAME}:events, live grants in kg:{NAME}:grants + :deadlines)
    Redis --XREAD BLOCK--> link (reader thread) --FleetApply--> loop: grant/revoke here
    loop: Vet of an SPA/TOTP/one-time knock --claim--> link: SET key NX PX ttl
          --FleetClaimed--> loop: the deferred vet finished (taken: refused)
    link: reachable or not --FleetHealth--> loop (status, metrics, one log line)

On (re)connect the reader reads the live grants (catch-up) before following the
stream, and the writer publishes what was queued during the outage and is still live.

Modules: :mod:`.messages` (the messages, the items, the key layout: pure),
:mod:`.store` (the store protocol and an in-memory store for tests),
:mod:`.redis_store` (redis-py), :mod:`.link` (the threads).
"""
