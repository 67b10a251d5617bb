"""Single Packet Authorization, wire-compatible with fwknop 2.6.10 (Rijndael + HMAC-SHA256).

:mod:`appliance.spa.wire` builds and opens packets; :mod:`appliance.spa.keyfile` reads
fwknop client key files (``~/.fwknoprc`` format and ``fwknop --key-gen`` output).
This package needs the ``cryptography`` package; ``appliance.core`` never imports it.
"""
