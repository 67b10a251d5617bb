"""Real receivers for the notification tests, run inside a test namespace (loopback only).

``webhook``: an http.server that verifies each request's HMAC-SHA256 signature with the
README's own recipe (its ``key`` and ``verified``, run as shown there), answers 204 (or
401 when the signature is wrong) and appends one JSON line per request to ``--out``:
``{"verified": bool, "event": {...}}``. ``smtp``: aiosmtpd's server that writes each
message it receives to ``--out`` as one JSON line (``{"from", "to", "data"}``).
``blackhole``: accepts connections and never answers (a hung receiver). Each prints
``ready`` once it listens and runs until SIGTERM.

    python -m tests.integration.notify_receivers webhook --port 8765 --secret-file F --out F
    python -m tests.integration.notify_receivers smtp --port 8025 --out F
    python -m tests.integration.notify_receivers blackhole --port 8765 --out F
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def readme_recipe() -> dict[str, Any]:
    """The receiver's code exactly as the README shows it (``key``, ``verified``): the
    test receiver verifies with it, not with the product's own code."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        if "def verified(" in block:
            namespace: dict[str, Any] = {}
            exec(compile(block, "README.md", "exec"), namespace)
            return namespace
    raise AssertionError("README.md: no python block with def verified(")


def webhook(port: int, secret_file: Path, out: Path) -> None:
    recipe = readme_recipe()
    verified = recipe["verified"]
    secret = recipe["key"](str(secret_file))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            ok = bool(verified(secret, self.headers, body))
            try:
                event: Any = json.loads(body)
            except ValueError:
                event = body.decode(errors="replace")
            with lock, out.open("a") as file:
                file.write(json.dumps({"verified": ok, "event": event}) + "\n")
            self.send_response(204 if ok else 401)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever()
    server.server_close()


def chat(port: int, out: Path) -> None:
    """Records every request as it came: method, path, the headers a chat service reads,
    and the body (parsed when it is JSON); answers 200."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            text = body.decode("utf-8", "replace")
            parsed: Any = text
            if "json" in self.headers.get("Content-Type", ""):
                parsed = json.loads(text)  # a body that is not JSON fails the test
            line = {
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "title": self.headers.get("Title"),
                "content_type": self.headers.get("Content-Type"),
                "body": parsed,
            }
            with lock, out.open("a") as file:
                file.write(json.dumps(line) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_PUT = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever()
    server.server_close()


def blackhole(port: int, out: Path) -> None:
    """Accepts every connection and never answers (a hung receiver); appends one line
    per connection to ``out``."""
    import socket

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.settimeout(0.2)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        held.append(conn)  # read nothing, answer nothing, close nothing
        with out.open("a") as file:
            file.write(json.dumps({"connection": len(held)}) + "\n")
    for conn in held:
        conn.close()
    server.close()


def smtp(port: int, out: Path) -> None:
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            data = envelope.content.decode("utf-8", "replace")
            line = {"from": envelope.mail_from, "to": envelope.rcpt_tos, "data": data}
            with out.open("a") as file:
                file.write(json.dumps(line) + "\n")
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    controller.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("webhook", "chat", "smtp", "blackhole"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--secret-file", type=Path)
    args = parser.parse_args()
    if args.kind == "webhook":
        webhook(args.port, args.secret_file, args.out)
    elif args.kind == "chat":
        chat(args.port, args.out)
    elif args.kind == "blackhole":
        blackhole(args.port, args.out)
    else:
        smtp(args.port, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
