"""Notifications: the daemon's decisions sent out, without ever slowing the loop.

::

    loop --> EventLog.publish --> Follower (bounded; the loop never waits)
        --> Notifications thread (hub.py): drains it at once; for each notifier:
              kind in its events? --> webhook/chat: Aggregator (flood.py): records one
                                         address causes beyond 5 a minute, and knock
                                         noise, become one summary a minute (when
                                         something was held or the noise is a flood)
                                  --> mail: Digest (digest.py), rendered on its schedule
        --> the notifier's Delivery (delivery.py): a bounded queue (the oldest dropped
            and counted when full) and a thread of its own that sends (senders.py, one
            deadline a request), retries with exponential backoff, logs once per failure
            streak; nothing it raises ends the thread

A reload reconfigures the hub in place (``Notifications.reconfigure``): a notifier kept
by name keeps its queue, flood window and digest.

Pure parts (no threads, no I/O, time as an argument): template.py (chat bodies escaped
for their content type), sign.py (the webhook's HMAC-SHA256 signature), flood.py,
digest.py. Settings: ``Notifier`` in :mod:`appliance.config.schema`, read by
:mod:`appliance.config.yaml_notify`.
"""
