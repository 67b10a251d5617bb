"""knockgate: a port-knocking appliance.

Data flow (each arrow is plain data)::

    knockgate.yaml / knockd.conf --config--> Config (frozen dataclasses)
        --runtime.preflight--> refused before anything is touched, or run
                                                 |
    AF_PACKET + BPF (capture.sniffer), pcap --capture.decode--> Packet events
        (live: minus what the host's stack would drop, capture.checksum)
        UDP payload on an SPA port --capture.spa (HMAC, then spa.wire decrypt)--> SpaKnock
                                                 v
          runtime.daemon loop --> core.engine.KnockEngine.handle(event) -> [Command]
                                                 |
        records first (MarkSequenceUsed / SpaDigestSeen / TotpStepUsed: no record, no
        grant), then Grant / Revoke / RunCommand, log records; events carry the monotonic
        clock (WallClock relates the wall clock); the engine owns its deadlines and the
        loop asks next_deadline() after every pass
                                                 v
     adapters: firewall (nftables | iptables | memory), runtime.actions (commands),
     runtime.services -> services.launcher (Docker), one-time file, runtime.state
     (replay cache, used TOTP steps), runtime.logs

``appliance.core`` is pure (standard library, no I/O, no clock): it is what the
unit tests drive with scripted events. Everything with a side effect lives at
the edges and is driven by the commands the core returns.
"""

__version__ = "0.1.0"
