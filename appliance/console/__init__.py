"""Views for people at a terminal, built on the daemon's status socket.

    status socket --query()--> snapshot dict --+
                 --events()--> recent records --+--> top.frame() --> rich renderable
    two snapshots --top.rates()--> Rate rows ---+

Nothing here is imported by the daemon: rich is loaded only by ``knockgate top``.
"""
