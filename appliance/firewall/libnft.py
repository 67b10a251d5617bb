"""libnftables' JSON interface, through ctypes, and the one read it cannot do safely.

Debian's own binding (python3-nftables) is not on PyPI, so this is a small one of
our own: one context (``nft_ctx_new``), output and errors buffered, every command a
``{"nftables": [...]}`` document in and, for a listing, one out
(``NFT_CTX_OUTPUT_JSON``). A batch of commands is one netlink transaction: all or
nothing. No fork: a grant is one library call.

Table flags are read over netlink (``NFT_MSG_GETTABLE``), not from the JSON: nft
1.0.6 (Debian bookworm) frees a table's flags array before it prints it when the
table has exactly one flag (``dormant``), so listing such a table as JSON in-process
corrupts the daemon's heap. :meth:`Libnftables.table_flags` lets the caller list only
tables without flags.

In another network namespace (``netns``, for tests) the context's netlink socket
and the flags socket are opened inside it, so every later call goes there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from appliance.errors import FirewallError

__all__ = [
    "JSON",
    "OUTPUT_STATELESS",
    "OUTPUT_TERSE",
    "Libnftables",
    "NftError",
    "flag_names",
]

JSON = dict[str, Any]

# libnftables.h: enum nft_ctx_output_flags
OUTPUT_STATELESS = 1 << 0  # no counter values, quota use, ...
OUTPUT_JSON = 1 << 4
OUTPUT_TERSE = 1 << 11  # no set elements (``list ruleset`` does not even fetch them)

# linux/netfilter/nf_tables.h: enum nft_table_flags
TABLE_FLAGS = {1: "dormant", 2: "owner", 4: "persist"}
NFPROTO_INET = 1

_NETLINK_NETFILTER = 12
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NFNL_SUBSYS_NFTABLES = 10
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NFTA_TABLE_NAME = 1
_NFTA_TABLE_FLAGS = 2
_CLONE_NEWNET = 0x40000000
_NETLINK_TIMEOUT = 5.0  # seconds


class NftError(FirewallError):
    """libnftables refused a batch; ``error`` is its own message."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@contextlib.contextmanager
def _inside(netns: str | None) -> Iterator[None]:
    """Run the block in network namespace ``netns`` (``ip netns`` name; None: here).

    setns(2) moves only the calling thread; it is moved back before anything else runs.
    """
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise FirewallError(f"nftables: setns {netns}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:  # stranded in the test's namespace
                raise RuntimeError(f"setns back from {netns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(home)


class Libnftables:
    """One libnftables context speaking JSON; raises :class:`FirewallError` when the
    library cannot be loaded."""

    def __init__(self, netns: str | None = None, path: str | None = None) -> None:
        path = path or ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.restype = None
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_ctx_output_set_flags.restype = None
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        except (OSError, AttributeError) as error:
            raise FirewallError(f"nftables: cannot load libnftables ({path}): {error}") from None
        self._lib = lib
        self._seq = 0
        with _inside(netns):  # both sockets are opened here, in the namespace
            self._ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens its netlink socket now
            if not self._ctx:
                raise FirewallError("nftables: nft_ctx_new failed")
            try:
                self._netlink = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER
                )
            except OSError as error:
                lib.nft_ctx_free(self._ctx)
                raise FirewallError(f"nftables: netlink socket: {error}") from None
        self._netlink.settimeout(_NETLINK_TIMEOUT)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON)
        self._flags = 0  # besides OUTPUT_JSON, always on

    def close(self) -> None:
        """Free the context and close both sockets (which otherwise keep a deleted
        network namespace alive); also done when the object is collected."""
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
        self._netlink.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def run(self, commands: Sequence[Mapping[str, Any]], flags: int = 0) -> list[JSON]:
        """Run ``commands`` as one batch; what a listing printed, ``metainfo`` left out.

        Raises :class:`NftError` with libnftables' message when the batch is refused
        (then nothing of it was applied).
        """
        document = _encode({"nftables": commands})
        if flags != self._flags:
            self._lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON | flags)
            self._flags = flags
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, document)
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        if rc != 0:
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            raise NftError(err.decode(errors="replace").strip() or f"error {rc}")
        if not out.strip():
            return []
        try:
            listed = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as error:
            raise FirewallError(f"nftables: unreadable JSON from libnftables: {error}") from None
        return [item for item in listed if isinstance(item, dict) and "metainfo" not in item]

    def table_flags(self, family: int = NFPROTO_INET) -> dict[str, int]:
        """Every table of ``family`` with its flags (0: none), over netlink."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        kind = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETTABLE
        request = struct.pack("=IHHII", 20, kind, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
        request += struct.pack("=BBH", family, 0, 0)  # nfgenmsg: family, version, res_id
        tables: dict[str, int] = {}
        try:
            self._netlink.send(request)
            while True:
                data = self._netlink.recv(1 << 16)
                for msg_type, msg_seq, body in _messages(data):
                    if msg_seq != seq:
                        continue  # an answer to an earlier, abandoned request
                    if msg_type == _NLMSG_DONE:
                        return tables
                    if msg_type == _NLMSG_ERROR:
                        errno = -struct.unpack_from("=i", body)[0]
                        if errno:
                            raise OSError(errno, os.strerror(errno))
                    elif msg_type == (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE:
                        attrs = dict(_attributes(body[4:]))  # after nfgenmsg
                        name = attrs.get(_NFTA_TABLE_NAME, b"").split(b"\0", 1)[0]
                        raw = attrs.get(_NFTA_TABLE_FLAGS, b"\0\0\0\0")
                        tables[name.decode(errors="replace")] = struct.unpack(">I", raw[:4])[0]
        except (OSError, struct.error) as error:
            raise FirewallError(f"nftables: netlink table list failed: {error}") from None


_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _encode(document: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(document).encode()


def flag_names(flags: int) -> str:
    """``dormant``, ``dormant,owner``, or the number for bits nft has no name for."""
    names = [name for bit, name in TABLE_FLAGS.items() if flags & bit]
    unknown = flags & ~sum(TABLE_FLAGS)
    return ",".join([*names, *([hex(unknown)] if unknown else [])])


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in ``data``."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _, seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            raise struct.error(f"netlink message of length {length} at {offset}")
        yield msg_type, seq, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
