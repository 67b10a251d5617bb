# The knockgate appliance: knock sniffer, firewall manager and service launcher under
# supervisord, in one host-network container. Builds offline from Debian packages
# (pip cannot reach an index inside image builds; the Python dependencies come from apt).
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-yaml python3-scapy python3-docker python3-cryptography python3-pyroute2 python3-qrcode libpcap0.8 \
      nftables iptables ipset conntrack iproute2 supervisor \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

COPY appliance /opt/knockgate/appliance
COPY compose/services /opt/knockgate/services
COPY compose/supervisord.conf /etc/supervisor/knockgate.conf.in
COPY compose/entrypoint.sh /usr/local/bin/knockgate-entrypoint
COPY compose/knockgate-serve /usr/local/bin/knockgate-serve
RUN printf '#!/bin/sh\nexec python3 -m appliance.cli "$@"\n' > /usr/local/bin/knockgate \
 && chmod 0755 /usr/local/bin/knockgate /usr/local/bin/knockgate-entrypoint /usr/local/bin/knockgate-serve \
 && python3 -m compileall -q /opt/knockgate/appliance
ENV PYTHONPATH=/opt/knockgate PYTHONUNBUFFERED=1 KNOCKGATE_CONFIG=/etc/knockgate/knockgate.yaml

VOLUME ["/etc/knockgate"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s \
  CMD knockgate status --config "$KNOCKGATE_CONFIG" >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/knockgate-entrypoint"]
