# The knockgate appliance: knock sniffer, firewall manager and service launcher under
# supervisord, in one host-network container. Builds offline from Debian packages
# (pip cannot reach an index inside image builds; the Python dependencies come from apt).
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-yaml python3-scapy python3-docker python3-cryptography python3-pyroute2 python3-qrcode python3-prometheus-client python3-rich python3-redis libpcap0.8 \
      nftables iptables ipset conntrack iproute2 supervisor \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The packet process (`knockgate packet`, started by `knockgate run`) reads untrusted bytes
# as this user: no home, no shell, no groups, no capabilities (README: security model).
# Fixed high uid, primary group nogroup: never a gid the host may give its docker group
# (the entrypoint refuses to start if the Docker socket's group is one of its groups).
RUN useradd --system --uid 64990 --gid nogroup --no-user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin knockgate-packet

# The launcher's user: the only one given the Docker socket (supervisord's command adds
# its gid, whatever the host gave it, with setpriv: nothing in /etc changes at run time).
RUN useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin knockgate-launcher

# The monitor (`knockgate run --user knockgate`) once it started the packet process: not
# root, CAP_NET_ADMIN, CAP_NET_RAW and CAP_KILL only. It and the launcher read /etc/knockgate
# through the group knockgate-config (read, never write). Fixed high ids, far from the gids
# hosts give their docker group (often 999 or near it).
RUN groupadd --system --gid 64110 knockgate-config \
 && groupadd --system --gid 64111 knockgate \
 && useradd --system --uid 64111 --gid knockgate --groups knockgate-config --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin knockgate \
 && usermod --append --groups knockgate-config knockgate-launcher

COPY appliance /opt/knockgate/appliance
COPY compose/services /opt/knockgate/services
COPY compose/supervisord.conf /etc/supervisor/knockgate.conf.in
COPY compose/entrypoint.sh /usr/local/bin/knockgate-entrypoint
COPY compose/knockgate-serve /usr/local/bin/knockgate-serve
RUN printf '#!/bin/sh\nexec python3 -m appliance.cli "$@"\n' > /usr/local/bin/knockgate \
 && chmod 0755 /usr/local/bin/knockgate /usr/local/bin/knockgate-entrypoint /usr/local/bin/knockgate-serve \
 && python3 -m compileall -q /opt/knockgate/appliance
# The image runs read-only (compose: read_only): the bytecode is compiled above, none is written.
ENV PYTHONPATH=/opt/knockgate PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    KNOCKGATE_CONFIG=/etc/knockgate/knockgate.yaml

VOLUME ["/etc/knockgate"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s \
  CMD knockgate status --config "$KNOCKGATE_CONFIG" >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/knockgate-entrypoint"]
