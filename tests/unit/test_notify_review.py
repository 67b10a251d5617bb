"""Regressions from the notifications review (issue 13 §3), named after the defect."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.config.schema import Chat, Mail, Notifier
from appliance.errors import ConfigError
from appliance.notify.delivery import Delivery, DeliveryError
from appliance.notify.hub import Notifications
from appliance.notify.senders import Message, Outgoing, http_send
from appliance.runtime.events_log import EventLog, EventRecord


def _config(tmp_path: Path, notify: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/s.sock\nstate_dir: {tmp_path}/state\n"
        "doors:\n  ssh:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {ports: [22/tcp], duration: 30}\n"
        "notify:\n" + notify
    )
    return load_config(str(path)).config


@pytest.fixture
def garbage_server() -> Iterator[int]:
    """A TCP server on loopback that answers every connection with an SSH banner."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    conn.recv(65536)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(2)
        server.close()


# ------------------------------------------------------------------ 1: threads never die


def test_a_garbage_answer_is_a_retryable_delivery_error(garbage_server: int) -> None:
    url = f"http://127.0.0.1:{garbage_server}/hook"
    with pytest.raises(DeliveryError) as caught:
        http_send("POST", url, b"{}", {}, 2.0)
    assert f"127.0.0.1:{garbage_server}" in str(caught.value)


def test_an_unexpected_exception_does_not_kill_the_delivery_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    def send(item: int) -> None:
        if item < 3:
            raise RuntimeError(f"bug {item}")
        got.append(item)

    delivery = Delivery("hook", send, limit=10)
    for item in range(5):
        delivery.put(item)
    with caplog.at_level(logging.WARNING, "knockgate.notify"):
        while delivery.step(0.0) is not None:
            pass
    assert got == [3, 4]
    assert delivery.counts["rejected"] == 3 and delivery.counts["sent"] == 2
    errors = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(errors) == 1  # logged once, not per item


def test_the_thread_survives_an_unexpected_exception() -> None:
    got: list[int] = []
    arrived = threading.Event()

    def send(item: int) -> None:
        if item == 0:
            raise KeyError("bug")
        got.append(item)
        arrived.set()

    delivery = Delivery("hook", send, limit=10)
    delivery.start()
    delivery.put(0)
    delivery.put(1)
    assert arrived.wait(2.0) and got == [1]
    delivery.stop(0.0)


def test_a_subject_with_a_line_break_is_refused(tmp_path: Path) -> None:
    mail = (
        "  daily:\n    mail: {host: 127.0.0.1, from: a@b.example, to: c@d.example,"
        ' subject: "x\\r\\nBcc: e@f.example"}\n'
    )
    with pytest.raises(ConfigError, match=r"notify\.daily\.mail\.subject.*one line"):
        _config(tmp_path, mail)


def test_a_mail_that_cannot_be_built_is_rejected_not_fatal() -> None:
    sent = Mail("127.0.0.1", "a@b.example", ("c@d.example",), port=9)
    from appliance.notify.delivery import Rejected
    from appliance.notify.senders import mail_sender

    with pytest.raises(Rejected):
        mail_sender(sent)(Message("bad\nsubject", "body"))


def test_the_hub_thread_survives_a_failing_route(caplog: pytest.LogCaptureFixture) -> None:
    events = EventLog()
    hub = Notifications((Notifier("chat", Chat("http://127.0.0.1:9/"), ("opened",)),), events)
    calls: list[str] = []
    original = hub.route

    def route(record: EventRecord, now: float) -> None:
        calls.append(record.door)
        if record.door == "bad":
            raise RuntimeError("bug in routing")
        original(record, now)

    hub.route = route  # type: ignore[method-assign]
    hub.start()
    try:
        events.event("opened", door="bad", address="198.18.1.7")
        events.event("opened", door="ssh", address="198.18.1.7")
        deadline = __import__("time").monotonic() + 2
        while len(calls) < 2 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.01)
        assert calls == ["bad", "ssh"]
        assert hub._thread is not None and hub._thread.is_alive()
    finally:
        hub.stop(0.2)


# ------------------------------------------------------------------ 2: no secret in logs


def test_a_token_in_a_url_path_or_query_is_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from appliance.notify.senders import chat_sender

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    url = f"http://127.0.0.1:{port}/bot123456:SECRETTOKEN/sendMessage?key=QUERYSECRET"
    delivery = Delivery("tg", chat_sender(Chat(url), "gate1"), limit=10)
    delivery.put(Outgoing(EventRecord(1.0, "opened", door="ssh", address="198.18.1.7")))
    with caplog.at_level(logging.DEBUG, "knockgate.notify"):
        delivery.step(0.0)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"http://127.0.0.1:{port}" in text
    assert "SECRETTOKEN" not in text and "QUERYSECRET" not in text and "bot" not in text


def test_a_user_and_password_in_a_url_are_refused_without_echoing_them(tmp_path: Path) -> None:
    chat = "  c:\n    chat: {url: 'http://user:PASSWORD@198.18.0.9/x'}\n"
    with pytest.raises(ConfigError, match=r"notify\.c\.chat\.url") as caught:
        _config(tmp_path, chat)
    assert "PASSWORD" not in str(caught.value)


def test_a_chat_url_can_come_from_a_private_file(tmp_path: Path) -> None:
    from appliance.notify.senders import chat_request

    secret = "https://hooks.slack.example/services/T000/B000/XXXXSECRET"
    (tmp_path / "slack.url").write_text(secret + "\n")
    os.chmod(tmp_path / "slack.url", 0o600)
    config = _config(tmp_path, "  slack:\n    chat: {preset: slack, url_file: slack.url}\n")
    (notifier,) = config.settings.notify
    assert isinstance(notifier.target, Chat) and notifier.target.url_file is not None
    assert "XXXXSECRET" not in repr(notifier)
    url, _, _ = chat_request(notifier.target, EventRecord(1.0, "opened", door="ssh"), "gate1")
    assert url == secret
    with pytest.raises(ConfigError, match="exactly one of url, url_file"):
        _config(tmp_path, "  s:\n    chat: {url: 'http://198.18.0.9/', url_file: slack.url}\n")
    os.chmod(tmp_path / "slack.url", 0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        _config(tmp_path, "  slack:\n    chat: {preset: slack, url_file: slack.url}\n")


# ------------------------------------------------------------------ 4: floods, steady state


def test_one_stray_knock_gives_no_summary() -> None:
    from appliance.notify.flood import Aggregator

    aggregator = Aggregator()
    sent = aggregator.offer(EventRecord(0.0, "knocks", counts={"ssh": {"first_knock": 1}}), 0.0)
    sent += aggregator.offer(EventRecord(5.0, "knocks", counts={"ssh": {"stage": 1}}), 5.0)
    for now in (30.0, 61.0, 120.0):
        sent += aggregator.due(now, now)
    assert sent == []
    # background scanning, every minute, forever: still nothing
    for minute in range(2, 30):
        now = minute * 60.0
        counts = {"ssh": {"first_knock": 20}}
        sent += aggregator.offer(EventRecord(now, "knocks", counts=counts), now)
        sent += aggregator.due(now + 61.0, now + 61.0)
    assert sent == [] and aggregator.flush(2000.0, 2000.0) == []


def test_a_flood_of_noise_over_the_threshold_is_summarised() -> None:
    from appliance.notify.flood import Aggregator

    aggregator = Aggregator(threshold=100)
    aggregator.offer(EventRecord(0.0, "knocks", counts={"ssh": {"first_knock": 150}}), 0.0)
    (summary,) = aggregator.due(60.0, 60.0)
    assert summary.detail.startswith("150 first knocks in the last")


def test_many_opens_from_many_addresses_in_a_minute_are_summarised() -> None:
    from appliance.notify.flood import Aggregator

    aggregator = Aggregator()
    sent: list[EventRecord] = []
    for i in range(200):
        for kind in ("opened", "closed", "expired", "grant-failed"):
            record = EventRecord(i * 0.1, kind, door="ssh", address=f"198.18.{i // 250}.{i % 250}")
            sent += aggregator.offer(record, i * 0.1)
    service = EventRecord(30.0, "service-started", service="git")
    sent += aggregator.offer(service, 30.0)  # not an address's doing: passes
    sent += aggregator.due(60.0, 60.0)
    assert len(sent) <= 7, [r.kind for r in sent]  # 5 one by one, the service, 1 summary
    assert service in sent
    summary = sent[-1]
    assert summary.kind == "knocks"
    assert "795 more events not sent one by one" in summary.detail
    assert "198 opened" in summary.detail and "199 expired" in summary.detail


def test_the_flood_threshold_is_a_setting(tmp_path: Path) -> None:
    chat = "  c:\n    chat: {url: 'http://198.18.0.9/x'}\n    flood_threshold: 5\n"
    (notifier,) = _config(tmp_path, chat).settings.notify
    assert notifier.flood_threshold == 5
    hub = Notifications((notifier,), EventLog(), host="gate1")
    (route,) = hub.routes
    assert route.aggregator is not None and route.aggregator.threshold == 5
    with pytest.raises(ConfigError, match=r"notify\.c\.flood_threshold"):
        _config(tmp_path, chat.replace("5", "0"))


def test_the_budget_of_records_an_address_causes_is_a_setting(tmp_path: Path) -> None:
    """``per_minute``: a host that many people open sends more opens one by one."""
    chat = "  c:\n    chat: {url: 'http://198.18.0.9/x'}\n    per_minute: 40\n"
    (notifier,) = _config(tmp_path, chat).settings.notify
    assert notifier.per_minute == 40
    hub = Notifications((notifier,), EventLog(), host="gate1")
    (route,) = hub.routes
    assert route.aggregator is not None
    sent: list[EventRecord] = []
    for i in range(50):
        record = EventRecord(float(i), "opened", door="ssh", address=f"198.18.1.{i + 1}")
        sent += route.aggregator.offer(record, float(i))
    assert len(sent) == 40
    (default,) = _config(tmp_path, chat.replace("    per_minute: 40\n", "")).settings.notify
    assert default.per_minute == 5
    with pytest.raises(ConfigError, match=r"notify\.c\.per_minute"):
        _config(tmp_path, chat.replace("40", "-1"))


# ------------------------------------------------------------------ 3: permanent errors


def test_a_non_latin1_detail_in_a_header_is_encoded_not_retried_forever() -> None:
    from appliance.notify.senders import chat_request
    from appliance.notify.template import render

    chat = Chat("http://198.18.0.9/t", headers=(("Title", "{detail}"),))
    record = EventRecord(1.0, "service-failed", service="git", detail="can\u2019t start\x07 \u2603")
    _, _, headers = chat_request(chat, record, "gate1")
    value = headers["Title"]
    value.encode("ascii")  # an RFC 2047 encoded word: plain ASCII
    assert value.startswith("=?utf-8?b?")
    import email.header

    decoded = str(email.header.make_header(email.header.decode_header(value)))
    assert decoded == "can\u2019t start \u2603"  # the control character is dropped
    assert render("{detail}", {"detail": "plain\x00 text\r\n"}, "header") == "plain text"


def test_a_request_that_cannot_be_built_is_rejected_not_retried() -> None:
    from appliance.notify.delivery import Rejected

    with pytest.raises(Rejected):
        http_send("POST", "http://127.0.0.1:9/x", b"", {"X-A": "caf\u00e9 \u2603"}, 1.0)
    with pytest.raises(Rejected):
        http_send("POST", "http://127.0.0.1:9/x", b"", {"X-A": "a\r\nb: c"}, 1.0)


# ------------------------------------------------------------------ 5: reload keeps data


def test_a_reload_keeps_an_unchanged_notifier_s_queue_and_digest(tmp_path: Path) -> None:
    from appliance.config.schema import Webhook

    hook = Notifier("hook", Webhook("http://127.0.0.1:9/h", "f", b"k"), ("opened",))
    mail = Notifier("mail", Mail("127.0.0.1", "a@b", ("c@d",), port=9, every=3600.0), ("opened",))
    chat = Notifier("chat", Chat("http://127.0.0.1:9/c"), ("opened",))
    events = EventLog()
    hub = Notifications((hook, mail, chat), events, host="gate1")  # not started: no sends
    for i in range(3):
        hub.route(EventRecord(1.0, "opened", door="ssh", address=f"198.18.1.{i}"), 1.0)
    hook_delivery = hub.routes[0].delivery
    digest = hub.routes[1].digest
    assert digest is not None and digest.opens == {"ssh": 3}
    rotated = Notifier("hook", Webhook("http://127.0.0.1:9/h", "f", b"new key"), ("opened",))
    mail2 = Notifier(
        "mail", Mail("127.0.0.1", "a@b", ("c@d",), port=9, every=3600.0, subject="x"), ("opened",)
    )
    ntfy = Notifier("ntfy", Chat("http://127.0.0.1:9/n"), ("opened",))
    hub.reconfigure((rotated, mail2, ntfy))
    assert [r.notifier.name for r in hub.routes] == ["hook", "mail", "ntfy"]
    assert hub.routes[0].delivery is hook_delivery and hook_delivery.queued() == 3
    assert hub.routes[0].notifier is rotated
    assert hub.routes[1].digest is digest and digest.opens == {"ssh": 3}
    assert hub.notifiers == (rotated, mail2, ntfy)
    _, queued = hub.counts()
    assert queued == {"hook": 3, "mail": 0, "ntfy": 0}


def test_a_daemon_reload_reconfigures_the_running_hub_without_duplicates(tmp_path: Path) -> None:
    import time

    from appliance.firewall.memory import MemoryBackend
    from appliance.runtime.daemon import Daemon

    got: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    (tmp_path / "hook.secret").write_text("s3cret\n")
    os.chmod(tmp_path / "hook.secret", 0o600)
    hook = (
        f'  hook:\n    webhook: {{url: "http://127.0.0.1:{port}/x", secret_file: hook.secret}}\n'
        "    events: [reload, opened]\n"
    )
    _config(tmp_path, hook)
    path = str(tmp_path / "k.yaml")
    daemon = Daemon(load_config(path), MemoryBackend(time.monotonic), capture=False)
    daemon.start()
    try:
        first = daemon.notifications
        assert first is not None
        (tmp_path / "hook.secret").write_text("rotated\n")  # a changed notifier
        daemon.events.event("opened", door="ssh", address="198.18.1.7")
        daemon.reload()
        assert daemon.notifications is first  # the same hub: one subscription
        daemon.events.event("opened", door="ssh", address="198.18.1.8")
        deadline = time.monotonic() + 3
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a duplicate would arrive meanwhile
    finally:
        daemon.shutdown()
        server.shutdown()
        server.server_close()
    kinds = [json.loads(body)["kind"] for body in got]
    assert sorted(kinds) == ["opened", "opened", "reload"], kinds


# ------------------------------------------------------------------ 6: one deadline a request


@pytest.fixture
def trickler() -> Iterator[int]:
    """A loopback server that answers one byte every 0.1 s, forever (until the test ends):
    an HTTP status line and endless headers, or an SMTP greeting that never ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    done = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            payload = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
            for byte in payload:
                if done.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(2)
        server.close()


def test_a_trickling_http_receiver_cannot_hold_a_send_past_its_timeout(trickler: int) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out"):
        http_send("POST", f"http://127.0.0.1:{trickler}/x", b"{}", {}, 1.0)
    took = time.monotonic() - started
    print(f"http send against a trickling receiver, timeout 1 s: gave up after {took:.2f} s")
    assert took < 1.6


def test_a_trickling_smtp_server_cannot_hold_a_send_past_its_timeout(trickler: int) -> None:
    import time

    from appliance.notify.senders import mail_sender

    mail = Mail("127.0.0.1", "a@b.example", ("c@d.example",), port=trickler, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out"):
        mail_sender(mail)(Message("subject", "body"))
    took = time.monotonic() - started
    print(f"mail send against a trickling server, timeout 1 s: gave up after {took:.2f} s")
    assert took < 1.6


# ------------------------------------------------------------------ 7: binary secrets


def test_a_binary_webhook_secret_is_used_as_is(tmp_path: Path) -> None:
    raw = bytes(range(256)) + b"\xff\xfe"
    (tmp_path / "hook.secret").write_bytes(raw + b"\n")
    os.chmod(tmp_path / "hook.secret", 0o600)
    hook = '  hook:\n    webhook: {url: "http://127.0.0.1:9/x", secret_file: hook.secret}\n'
    (notifier,) = _config(tmp_path, hook).settings.notify
    assert notifier.target.secret == raw  # type: ignore[union-attr]


def test_a_token_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(b"\xff\xfetoken\n")
    os.chmod(tmp_path / "t", 0o600)
    chat = "  c:\n    chat: {preset: matrix, url: 'http://198.18.0.9/x', token_file: t}\n"
    with pytest.raises(ConfigError, match=r"notify\.c\.chat\.token_file.*UTF-8"):
        _config(tmp_path, chat)


# ------------------------------------------------------------------ 9: a rejection is no outage


def test_a_rejection_does_not_back_off_or_start_a_failure_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from appliance.notify.delivery import Rejected

    answers = ["401"] * 50 + ["ok"]
    got: list[int] = []

    def send(item: int) -> None:
        if answers.pop(0) == "401":
            raise Rejected("HTTP 401 from http://127.0.0.1:9: dropped")
        got.append(item)

    delivery = Delivery("hook", send, limit=100)
    for item in range(51):
        delivery.put(item)
    now = 0.0
    with caplog.at_level(logging.INFO, "knockgate.notify"):
        while (due := delivery.step(now)) is not None:
            assert due == now  # the next one at once: no backoff
    assert got == [50] and delivery.counts["rejected"] == 50
    assert not delivery.failing()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "HTTP 401" in lines[0], lines  # once, no "delivering again"


# ------------------------------------------------------------------ 8: a delivery id


def test_a_webhook_delivery_carries_one_id_in_body_and_header_across_retries() -> None:
    from appliance.config.schema import Webhook
    from appliance.notify.senders import Outgoing, webhook_sender
    from appliance.notify.sign import verify

    seen: list[tuple[dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((dict(self.headers), body))
            self.send_response(503 if len(seen) == 1 else 204)  # the first: try again
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/h"
        delivery = Delivery("hook", webhook_sender(Webhook(url, "f", b"k"), "gate1"), limit=10)
        delivery.put(Outgoing(EventRecord(1.0, "opened", door="ssh", address="198.18.1.7")))
        delivery.put(Outgoing(EventRecord(1.0, "opened", door="ssh", address="198.18.1.7")))
        now = 0.0
        while (due := delivery.step(now)) is not None:
            now = due
    finally:
        server.shutdown()
        server.server_close()
    ids = [json.loads(body)["id"] for _, body in seen]
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]  # a retry keeps its id
    for headers, body in seen:
        assert headers["X-Knockgate-Delivery"] == json.loads(body)["id"]
        stamp, mac = headers["X-Knockgate-Timestamp"], headers["X-Knockgate-Signature"]
        assert verify(b"k", stamp, body, mac, float(stamp))  # the id is signed


# ------------------------------------------------------------------ 10: SIGUSR1


def test_a_digest_asked_for_moves_the_schedule_as_the_readme_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import time

    wall = time.mktime((2026, 12, 5, 15, 0, 0, 0, 0, -1))  # 15:00 local
    every = Notifier("e", Mail("127.0.0.1", "a@b", ("c@d",), port=9, every=3600.0), ("opened",))
    at = Notifier("a", Mail("127.0.0.1", "a@b", ("c@d",), port=9, at=(7, 0)), ("opened",))
    hub = Notifications((every, at), EventLog(), host="gate1", wall=lambda: wall)
    hub.digest_now()
    hub.tick(0.0, wall + 600)  # 15:10
    assert hub.routes[0].due == wall + 600 + 3600  # every: a full period later
    assert time.localtime(hub.routes[1].due)[2:5] == (6, 7, 0)  # at: the next 07:00
    chat = Notifications((Notifier("c", Chat("http://127.0.0.1:9/"), ("opened",)),), EventLog())
    with caplog.at_level(logging.INFO, "knockgate.notify"):
        chat.digest_now()
        chat.tick(0.0, wall)
        chat.tick(1.0, wall)
    assert [r.getMessage() for r in caplog.records] == [
        "SIGUSR1: no mail notifier configured: no digest to send"
    ]


# ------------------------------------------------------------------ 11, 13: the README recipe


def test_the_readme_receiver_recipe_verifies_and_never_raises(tmp_path: Path) -> None:
    import time

    from appliance.notify.senders import webhook_body
    from appliance.notify.sign import signed_headers
    from tests.integration.notify_receivers import readme_recipe

    recipe = readme_recipe()
    raw = bytes(range(256))
    (tmp_path / "hook.secret").write_bytes(raw + b"\n")
    secret = recipe["key"](str(tmp_path / "hook.secret"))
    assert secret == raw
    body = webhook_body(EventRecord(1.0, "opened", door="ssh"), "gate1", "id1")
    headers = signed_headers(raw, time.time(), body)
    verified = recipe["verified"]
    assert verified(secret, headers, body)
    assert not verified(secret, headers, body + b" ")
    stamp = headers["X-Knockgate-Timestamp"]
    for bad in (
        {},
        {**headers, "X-Knockgate-Timestamp": "12x"},
        {**headers, "X-Knockgate-Timestamp": "\u00b2"},
        {**headers, "X-Knockgate-Timestamp": str(int(stamp) - 400)},
        {**headers, "X-Knockgate-Signature": "sha256=\u00e9\u2603"},
        {"X-Knockgate-Timestamp": stamp},
    ):
        assert verified(secret, bad, body) is False


def test_an_at_sign_in_a_path_or_query_is_not_a_password(tmp_path: Path) -> None:
    for url in ("http://198.18.0.9/a@b", "http://198.18.0.9?to=me@example.org"):
        (notifier,) = _config(tmp_path, f"  c:\n    chat: {{url: '{url}'}}\n").settings.notify
        assert notifier.target.url == url  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, "  c:\n    chat: {url: 'ftp://u:PASSWORD@198.18.0.9/'}\n")
    assert "PASSWORD" not in str(caught.value)


def test_an_untrusted_certificate_is_retried_not_rejected(tmp_path: Path) -> None:
    import ssl
    import subprocess

    files = ["-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            *files,
            *subject,
        ],
        check=True,
        capture_output=True,
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from appliance.notify.delivery import Rejected

        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            http_send("POST", f"https://127.0.0.1:{server.server_address[1]}/", b"", {}, 2.0)
        assert not isinstance(caught.value, Rejected)  # a renewed certificate fixes it
    finally:
        server.shutdown()
        server.server_close()


def test_a_password_that_ends_the_host_early_is_refused_without_echoing_it(
    tmp_path: Path,
) -> None:
    for url in (
        "http://kg:s3cr/et@198.18.0.9/",  # urlsplit reads 's3cr' as the port
        "http://kg:s3cr#et@198.18.0.9/",
        "http://kg:s3cr?et@198.18.0.9/",
        "http://198.18.0.9:99999/x",  # a bad port: every item would be dropped
        "http://198.18.0.9:0/x",
    ):
        with pytest.raises(ConfigError, match=r"notify\.c\.chat\.url") as caught:
            _config(tmp_path, f"  c:\n    chat: {{url: '{url}'}}\n")
        assert "s3cr" not in str(caught.value) and "Port" not in str(caught.value)


def test_a_control_character_in_a_url_is_refused_and_never_retried(tmp_path: Path) -> None:
    from appliance.notify.delivery import Rejected

    with pytest.raises(ConfigError, match=r"notify\.c\.chat\.url: .* holds a control character"):
        _config(tmp_path, '  c:\n    chat: {url: "http://198.18.0.9/a\\x01b"}\n')
    with pytest.raises(Rejected, match="not a valid URL: dropped"):  # not retried forever
        http_send("POST", "http://127.0.0.1:9/a\x01b", b"", {}, 1.0)


def test_a_url_that_does_not_parse_at_send_time_is_dropped_without_its_words() -> None:
    from appliance.notify.delivery import Rejected

    with pytest.raises(Rejected) as caught:
        http_send("POST", "http://kg:s3cr/et@198.18.0.9/", b"", {}, 1.0)
    assert "s3cr" not in str(caught.value)
