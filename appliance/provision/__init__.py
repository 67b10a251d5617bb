"""Provisioning: ``knockgate user add / list / remove`` and the client bundle.

::

    user add NAME --door D ─► keys (SPA: new pair per door; TOTP/sequence: the door's)
        │                     │
        │                     └► knockgate-users.yaml (managed, 0600, atomic, checked first)
        │                                  │ merged by load_config (appliance.config)
        ├─► reload the running daemon (its status socket's pid, the appliance's PID 1,
        │   or pid_file: SIGHUP, confirmed by its reload counters)
        └─► bundle: client config, .fwknoprc stanzas, ~/.ssh/config, knockgate:// URIs + QR

:mod:`appliance.provision.users` changes the managed file, :mod:`.reload` signals the
daemon, :mod:`.bundle` renders what the client needs (pure text, no I/O).
"""
