"""The knocker's side of a session: knock a door, wait until it opens, relay to it.

::

    knockgate knock HOST --door NAME --config FILE --wait
    knockgate connect HOST PORT --door NAME --config FILE      (ssh's ProxyCommand)

        DoorKnocker (door.py)  ── knock(now): sequence, TOTP or SPA packets ──> HOST
              │                   spa.py: one SPA packet per address (--dual-stack),
              │                   receipts awaited on each packet's own socket
              │
        wait_open (wait.py)    ── TCP connects to PORT until one is accepted;
              │                   WaitProgress (pure) says what to print and when to give up
              ▼
        relay (relay.py)       ── stdin -> socket, socket -> stdout, one selector loop,
                                  half-closes passed on; a Renewal timer (keepalive.py)
                                  re-knocks before the grant ends

Plain sockets, no threads, no root. Progress and errors go to stderr only: stdout
belongs to the relayed protocol.
"""
