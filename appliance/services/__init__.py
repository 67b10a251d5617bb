"""On-demand service containers: a knock starts a container, the grant waits for it.

* :mod:`appliance.services.runtime` — the ``ContainerRuntime`` protocol and a fake.
* :mod:`appliance.services.docker_runtime` — the Docker SDK adapter.
* :mod:`appliance.services.readiness` — "does it answer yet?" checks.
* :mod:`appliance.services.launcher` — the Docker side: run, wait ready, stop, adopt
  (when is decided by :mod:`appliance.core.lifecycle`).
* :mod:`appliance.services.broker` — ``knockgate launcher``: the process that alone reaches
  Docker, serving typed requests (:mod:`appliance.services.rpc`) to the monitor's
  :class:`~appliance.services.remote.RemoteRuntime` (``knockgate run --launcher SOCKET``).
* :mod:`appliance.services.conntrack` — open connections per host port, over netlink.
* :mod:`appliance.services.labels` — ``knockgate.*`` labels on the user's own containers,
  parsed and validated (label-gated services; not wired into the daemon yet).
* :mod:`appliance.services.discovery` — labelled containers from Docker's listing and
  events (not wired into the daemon yet).
"""
