"""On-demand service containers: a knock starts a container, the grant waits for it.

* :mod:`appliance.services.runtime` — the ``ContainerRuntime`` protocol and a fake.
* :mod:`appliance.services.docker_runtime` — the Docker SDK adapter.
* :mod:`appliance.services.readiness` — "does it answer yet?" checks.
* :mod:`appliance.services.launcher` — one service's life: start, share, idle, stop.
"""
