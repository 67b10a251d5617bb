"""Notifications: the daemon's decisions sent out, without ever slowing the loop.

::

    loop --> EventLog.publish --> Follower (bounded; the loop never waits)
        --> Notifications thread (hub.py): drains it at once; for each notifier:
              kind in its events? --> webhook/chat: Aggregator (flood.py): knock noise
                                         and refusals beyond a few a minute become one
                                         summary a minute
                                  --> mail: Digest (digest.py), rendered on its schedule
        --> the notifier's Delivery (delivery.py): a bounded queue (the oldest dropped
            and counted when full) and a thread of its own that sends (senders.py),
            retries with exponential backoff, logs once per failure streak

Pure parts (no threads, no I/O, time as an argument): template.py (chat bodies escaped
for their content type), sign.py (the webhook's HMAC-SHA256 signature), flood.py,
digest.py. Settings: ``Notifier`` in :mod:`appliance.config.schema`, read by
:mod:`appliance.config.yaml_notify`.
"""
