"""Notifications, the pure parts and the delivery policy, with fakes (no network).

Signing, chat templates escaped for their content type, the flood aggregation, the
digest's text, the queue bound, the backoff and the once-per-streak log, the settings
(secret files, inline secrets refused), the hub's routing and the metrics families.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import load_config
from appliance.config.schema import Chat, Mail, Notifier, Webhook
from appliance.errors import ConfigError
from appliance.notify.delivery import Delivery, DeliveryError, Rejected, backoff
from appliance.notify.digest import Digest, next_digest
from appliance.notify.flood import Aggregator
from appliance.notify.hub import Notifications
from appliance.notify.senders import chat_request, webhook_body
from appliance.notify.sign import signature, signed_headers, verify
from appliance.notify.template import TemplateError, check_template, render
from appliance.runtime.events_log import EventLog, EventRecord
from appliance.runtime.metrics import MetricsSnapshot
from appliance.runtime.metrics_server import MetricsHub

HOSTILE = 'door "x"\\\n</b>{text}&a=b\u2028'


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- signing


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"kind":"opened"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", "1700000000", body) == "sha256=" + expected
    headers = signed_headers(b"k", 1700000000.7, body)
    assert headers == {
        "X-Knockgate-Timestamp": "1700000000",
        "X-Knockgate-Signature": "sha256=" + expected,
    }


def test_a_receiver_refuses_a_changed_body_another_key_or_an_old_timestamp() -> None:
    body = b'{"kind":"opened"}'
    good = signature(b"k", "1000", body)
    assert verify(b"k", "1000", body, good, now=1010)
    assert not verify(b"k", "1000", body + b" ", good, now=1010)
    assert not verify(b"other", "1000", body, good, now=1010)
    assert not verify(b"k", "1000", body, good, now=2000)  # a replay, later
    assert not verify(b"k", "nope", body, good, now=1010)


def test_the_webhook_body_is_the_record_plus_host_and_version() -> None:
    record = EventRecord(1000.0, "opened", door="ssh", address="198.18.1.7", detail="22/tcp")
    data = json.loads(webhook_body(record, "gate1"))
    assert data["kind"] == "opened" and data["door"] == "ssh" and data["host"] == "gate1"
    assert data["address"] == "198.18.1.7" and "version" in data


# --------------------------------------------------------------------------- templates


def test_a_hostile_value_cannot_break_a_json_body() -> None:
    record = EventRecord(1000.0, "opened", door=HOSTILE, address="198.18.1.7", detail=HOSTILE)
    chat = Chat(
        url="http://127.0.0.1/x",
        body='{"text": "{text}", "door": "{door}"}',
        content_type="application/json",
    )
    _, body, headers = chat_request(chat, record, "gate1")
    data = json.loads(body)
    assert data["door"] == HOSTILE
    assert HOSTILE in data["text"] and data["text"].startswith("gate1: opened door")
    assert headers["Content-Type"] == "application/json"


def test_values_are_escaped_for_urls_forms_and_headers() -> None:
    values = {"door": "a b/&?#", "text": "x\r\nInjected: 1"}
    assert unquote(render("http://h/{door}", values, "url").split("/", 3)[3]) == "a b/&?#"
    assert "/" not in render("{door}", values, "url")
    assert render("t={door}", values, "application/x-www-form-urlencoded") == "t=a+b%2F%26%3F%23"
    assert render("{text}", values, "header") == "x Injected: 1"
    assert render('{"a": 1} {text}', values, "text/plain") == '{"a": 1} x\r\nInjected: 1'


def test_templates_that_cannot_be_filled_safely_are_refused() -> None:
    check_template('{"text": "{text}"}', "application/json")
    with pytest.raises(TemplateError, match="not valid JSON"):
        check_template('{"text": {text}}', "application/json")  # outside a string
    with pytest.raises(TemplateError, match="unknown placeholder"):
        check_template("{txet}", "text/plain")


def test_the_matrix_preset_puts_the_token_in_a_header_and_a_fresh_txn_in_the_url(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t\n")
    token.chmod(0o600)
    config = _config(
        tmp_path,
        "  room:\n    chat: {preset: matrix, token_file: token,\n"
        '           url: "https://m.example/_matrix/client/v3/rooms/r/send/m.room.message/{txn}"}\n',
    )
    chat = config.settings.notify[0].target
    assert isinstance(chat, Chat) and chat.method == "PUT"
    record = EventRecord(1000.0, "opened", door="ssh")
    url1, body, headers = chat_request(chat, record, "gate1")
    url2, _, _ = chat_request(chat, record, "gate1")
    assert headers["Authorization"] == "Bearer s3cr3t"
    assert url1 != url2 and url1.startswith("https://m.example/_matrix/")
    assert json.loads(body) == {"msgtype": "m.text", "body": "gate1: opened door ssh"}


# --------------------------------------------------------------------------- flood


def test_a_flood_becomes_one_summary_a_minute_and_a_few_refusals() -> None:
    aggregator = Aggregator()
    sent: list[EventRecord] = []
    now = 0.0
    for window in range(6):  # the event log's knocks summaries, every 10 s for a minute
        now = window * 10.0
        counts = {"ssh": {"first_knock": 2000}}
        sent += aggregator.offer(EventRecord(now, "knocks", counts=counts, detail="last 10 s"), now)
        for _ in range(100):  # the log's refusal budget, used up every window
            sent += aggregator.offer(EventRecord(now, "held-off", address="198.18.9.9"), now)
        sent += aggregator.due(now, now)
    assert [r.kind for r in sent] == ["held-off"] * 5  # nothing else yet
    sent += aggregator.due(60.0, 60.0)
    assert len(sent) == 6
    summary = sent[-1]
    assert summary.kind == "knocks"
    assert summary.detail.startswith("12 000 first knocks in the last minute")
    assert "595 more refusals not sent one by one (595 held-off)" in summary.detail
    assert aggregator.due(200.0, 200.0) == []  # quiet afterwards: nothing more


def test_other_records_pass_at_once_and_a_held_window_is_flushed_at_shutdown() -> None:
    aggregator = Aggregator()
    opened = EventRecord(1.0, "opened", door="ssh")
    assert aggregator.offer(opened, 1.0) == [opened]
    service = EventRecord(1.5, "service-started", service="git")
    assert aggregator.offer(service, 1.5) == [service]
    aggregator.offer(EventRecord(2.0, "knocks", counts={"ssh": {"reset": 3}}), 2.0)
    assert aggregator.flush(5.0, 5.0) == []  # a little noise, nothing held: no summary
    for second in range(7):
        aggregator.offer(EventRecord(2.0, "held-off", address="198.18.9.9"), 2.0 + second)
    aggregator.offer(EventRecord(9.0, "knocks", counts={"ssh": {"reset": 3}}), 9.0)
    (summary,) = aggregator.flush(12.0, 12.0)
    assert summary.detail.startswith("3 resets in the last 10 s; 2 more refusals")


def test_refusals_the_event_log_only_counted_reach_the_summary() -> None:
    """The log's own budget (100 refusal records a window) held some back: the notifier's
    summary counts them too, from the record's field, not its words."""
    from appliance.runtime.events_log import REFUSAL_BUDGET, SUMMARY_SECONDS

    now = [0.0]
    log = EventLog(wall=lambda: now[0], clock=lambda: now[0])
    for i in range(REFUSAL_BUDGET + 20):
        log.refusal("held-off", door="ssh", address=f"198.18.7.{i + 1}")
    now[0] = SUMMARY_SECONDS
    log.summarise()
    aggregator = Aggregator()
    for record in log.recent():
        aggregator.offer(record, record.time)
    (summary,) = aggregator.flush(20.0, 20.0)
    assert "115 more refusals not sent one by one (95 held-off, 20 only counted)" in summary.detail


# --------------------------------------------------------------------------- digest


def test_the_digest_sums_up_opens_failures_scanners_starts_and_noise() -> None:
    digest = Digest(since=0.0)
    for record in (
        EventRecord(1.0, "opened", door="ssh", address="198.18.1.7"),
        EventRecord(2.0, "opened", door="ssh", address="198.18.1.7"),
        EventRecord(3.0, "opened", door="web", address="198.18.1.8"),
        EventRecord(4.0, "grant-failed", door="web", address="198.18.1.8", detail="nft: boom"),
        EventRecord(5.0, "held-off", door="ssh", address="198.18.9.9"),
        EventRecord(6.0, "service-started", service="git"),
        EventRecord(7.0, "knocks", counts={"ssh": {"first_knock": 12000, "reset": 4}}),
        EventRecord(8.0, "closed", door="ssh", address="198.18.1.7"),
    ):
        digest.add(record)
    subject, body = digest.render("gate1", 86400.0)
    assert subject == "3 opens, 1 failures, 1 held off"
    assert "Opens: 3 (ssh: 2 from 1 address, web: 1 from 1 address)" in body
    assert "Failures: 1 (1 grants failed, 0 services failed, 0 reloads refused)" in body
    assert "Scanners held off: 1 (from 1 address)" in body
    assert "Service starts: git: 1" in body
    assert "Knock noise: 12 000 first knocks, 4 resets" in body
    assert "grant-failed door web for 198.18.1.8: nft: boom" in body


def test_a_quiet_period_is_one_line() -> None:
    digest = Digest(since=0.0)
    digest.add(EventRecord(1.0, "reload", detail="1 door(s)"))  # routine, not news
    subject, body = digest.render("gate1", 3600.0)
    assert subject == "quiet" and body.count("\n") == 1 and "nothing to report" in body


def test_the_next_digest_is_at_the_set_time_or_after_every() -> None:
    now = time.mktime((2026, 12, 5, 6, 0, 0, 0, 0, -1))
    assert next_digest(now, 3600.0, (7, 0)) == now + 3600
    assert time.localtime(next_digest(now, None, (7, 0)))[3:5] == (7, 0)
    later = next_digest(now + 7200, None, (7, 0))  # 08:00: tomorrow's 07:00
    assert time.localtime(later)[2:5] == (6, 7, 0)


# --------------------------------------------------------------------------- delivery


class Receiver:
    def __init__(self) -> None:
        self.up = True
        self.got: list[int] = []
        self.attempts = 0

    def __call__(self, item: int) -> None:
        self.attempts += 1
        if self.up is None:
            raise Rejected("HTTP 400")
        if not self.up:
            raise DeliveryError("connection refused")
        self.got.append(item)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(50) == 300.0


def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    delivery = Delivery("hook", Receiver(), limit=3)
    for item in range(5):
        delivery.put(item)
    assert delivery.queued() == 3 and delivery.counts["dropped"] == 2
    while delivery.step(0.0) is not None:
        pass
    assert delivery.send.got == [2, 3, 4]  # type: ignore[attr-defined]


def test_a_down_receiver_is_retried_with_backoff_logged_once_and_gets_the_queue_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver()
    receiver.up = False
    delivery = Delivery("hook", receiver, limit=100)
    for item in range(3):
        delivery.put(item)
    caplog.set_level(logging.INFO, logger="knockgate.notify")
    now, waits = 0.0, []
    for _ in range(6):
        due = delivery.step(now)
        assert due is not None
        waits.append(due - now)
        assert delivery.step(now) == due  # not due yet: no attempt
        now = due
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert receiver.attempts == 6 and delivery.counts["failed"] == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot deliver (connection refused)" in warnings[0].message
    receiver.up = True
    while delivery.step(now) is not None:
        pass
    assert receiver.got == [0, 1, 2] and delivery.counts["sent"] == 3
    infos = [r.message for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "delivering again after 63 s: 6 attempts failed" in infos[0]
    assert "3 queued meanwhile" in infos[0]
    caplog.clear()
    delivery.put(9)
    delivery.step(now)
    assert caplog.records == []  # steady state: quiet


def test_a_rejected_item_is_dropped_not_retried() -> None:
    receiver = Receiver()
    receiver.up = None  # answers 400
    delivery = Delivery("hook", receiver, limit=10)
    delivery.put(1)
    delivery.put(2)
    due = delivery.step(0.0)
    assert delivery.counts["rejected"] == 1 and delivery.queued() == 1 and due == 0.0
    receiver.up = True
    delivery.step(due)
    assert receiver.got == [2]


def test_the_thread_delivers_and_stop_never_waits_past_its_deadline() -> None:
    receiver = Receiver()
    delivery = Delivery("hook", receiver, limit=10)
    delivery.start()
    delivery.put(1)
    deadline = time.monotonic() + 2
    while receiver.got != [1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.got == [1]
    receiver.up = False
    delivery.put(2)
    started = time.monotonic()
    delivery.stop(started + 0.3)
    assert delivery.join(started + 0.3) == 1  # given up on, counted
    assert time.monotonic() - started < 1.5
    assert delivery.counts["dropped"] == 1


# --------------------------------------------------------------------------- settings


def _config(tmp_path: Path, notify: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "k.yaml"
    path.write_text(
        f"status_socket: {tmp_path}/s.sock\nstate_dir: {tmp_path}/state\n"
        "doors:\n  ssh:\n    knock: {sequence: [7113, 2231/udp, 9157]}\n"
        "    open: {ports: [22/tcp], duration: 30}\n"
        "notify:\n" + notify
    )
    return load_config(str(path)).config


def test_a_webhook_reads_its_secret_from_a_private_file(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("s3cret\n")
    os.chmod(tmp_path / "hook.secret", 0o640)
    config = _config(
        tmp_path, '  hook:\n    webhook: {url: "http://127.0.0.1:1/x", secret_file: hook.secret}\n'
    )
    (notifier,) = config.settings.notify
    assert isinstance(notifier.target, Webhook) and notifier.target.secret == b"s3cret"
    assert "s3cret" not in repr(config)
    assert "opened" in notifier.events and "closed" not in notifier.events


@pytest.mark.parametrize(
    ("notify", "message"),
    [
        (
            '  hook:\n    webhook: {url: "http://h/", secret_file: hook.secret}\n',
            "mode 0644: others may read it",
        ),
        (
            '  hook:\n    webhook: {url: "http://h/", secret: abc}\n',
            "notify.hook.webhook.secret: a secret is not written in the configuration",
        ),
        ('  hook:\n    webhook: {url: "ftp://h/", secret_file: none}\n', "not an http://"),
        ("  Bad!:\n    chat: {url: 'http://h/'}\n", "is not a notifier name"),
        (
            "  two:\n    chat: {url: 'http://h/'}\n    mail: {host: h, from: a@b, to: c@d}\n",
            "expected exactly one of webhook, chat, mail (got chat, mail)",
        ),
        ("  m:\n    mail: {host: h, from: a@b, to: c@d, every: 1h, at: '07:00'}\n", "every"),
        ("  m:\n    mail: {host: h, from: nobody, to: c@d}\n", "is not a mail address"),
        ("  c:\n    chat: {url: 'http://h/'}\n    events: [opened, nope]\n", "'nope'"),
    ],
)
def test_bad_notify_settings_name_the_line_and_key(
    tmp_path: Path, notify: str, message: str
) -> None:
    (tmp_path / "hook.secret").write_text("s3cret\n")
    os.chmod(tmp_path / "hook.secret", 0o644)
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, notify)
    assert message in str(error.value)
    assert "k.yaml:" in str(error.value)


def test_mail_settings_and_their_defaults(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "  daily:\n    mail: {host: 127.0.0.1, from: kg@example.org, to: ops@example.org}\n",
    )
    (notifier,) = config.settings.notify
    mail = notifier.target
    assert isinstance(mail, Mail)
    assert (mail.port, mail.tls, mail.every, mail.at, mail.to) == (
        25,
        "none",
        None,
        (7, 0),
        ("ops@example.org",),
    )
    assert "closed" in notifier.events  # a digest sums up everything


# --------------------------------------------------------------------------- hub, metrics


def test_the_hub_routes_by_kind_and_queues_for_each_notifier() -> None:
    clock = Clock()
    notifiers = (
        Notifier("hook", Webhook("http://127.0.0.1:9/", "f", b"k"), ("opened",)),
        Notifier("chat", Chat("http://127.0.0.1:9/"), ("opened", "closed")),
        Notifier("mail", Mail("127.0.0.1", "a@b", ("c@d",), every=60.0), ("opened",)),
    )
    hub = Notifications(notifiers, EventLog(), host="gate1", clock=clock, wall=clock)
    hub.route(EventRecord(1.0, "opened", door="ssh", address="198.18.1.7"), clock())
    hub.route(EventRecord(2.0, "closed", door="ssh", address="198.18.1.7"), clock())
    totals, queued = hub.counts()
    assert queued == {"hook": 1, "chat": 2, "mail": 0}
    hub.digest_now()
    hub.tick(clock(), clock())
    assert hub.counts()[1]["mail"] == 1
    assert totals[("hook", "sent")] == 0


def test_status_shows_each_notifier_with_its_deliveries_and_queue() -> None:
    from appliance.runtime.status import notification_lines

    clock = Clock()
    notifiers = (
        Notifier("hook", Webhook("http://127.0.0.1:9/", "f", b"k"), ("opened",)),
        Notifier("mail", Mail("127.0.0.1", "a@b", ("c@d",), every=60.0), ("opened",)),
    )
    hub = Notifications(notifiers, EventLog(), host="gate1", clock=clock, wall=clock)
    hub.route(EventRecord(1.0, "opened", door="ssh", address="198.18.1.7"), clock())
    rows = hub.snapshot()
    assert [(r["name"], r["kind"], r["queued"], r["sent"]) for r in rows] == [
        ("hook", "webhook", 1, 0),
        ("mail", "mail", 0, 0),
    ]
    assert notification_lines(rows)[0] == (
        "notify hook (webhook): sent 0, failed 0, rejected 0, dropped 0, queued 1"
    )
    rows[0]["failing"] = True
    assert notification_lines(rows)[0].endswith("queued 1, receiver FAILING (retrying)")
    assert notification_lines(None) == [] and notification_lines([]) == []


def test_the_notification_families_are_exposed() -> None:
    snapshot = MetricsSnapshot(
        taken=1.0,
        counters={},
        knocks={},
        spa_refused={},
        grants_open={},
        open_latency={},
        service_starts={},
        cold_start={},
        services_running={},
        doors=(),
        notifications={("hook", "sent"): 3, ("hook", "dropped"): 1},
        notifications_queued={"hook": 2},
    )
    hub = MetricsHub(lambda item: item.reply(snapshot), clock=lambda: 1.0)
    got = {}
    for family in text_string_to_metric_families(hub.exposition().decode()):
        for sample in family.samples:
            got[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert got[("knockgate_notifications_total", (("notifier", "hook"), ("outcome", "sent")))] == 3
    assert got[("knockgate_notifications_queued", (("notifier", "hook"),))] == 2


def test_a_reload_with_other_notifier_settings_reconfigures_the_hub(tmp_path: Path) -> None:
    from appliance.firewall.memory import MemoryBackend
    from appliance.runtime.daemon import Daemon

    (tmp_path / "hook.secret").write_text("s3cret\n")
    os.chmod(tmp_path / "hook.secret", 0o600)
    hook = '  hook:\n    webhook: {url: "http://127.0.0.1:9/x", secret_file: hook.secret}\n'
    _config(tmp_path, hook)
    path = str(tmp_path / "k.yaml")
    daemon = Daemon(load_config(path), MemoryBackend(time.monotonic), capture=False)
    daemon.start()
    try:
        first = daemon.notifications
        assert first is not None and [n.name for n in first.notifiers] == ["hook"]
        daemon.reload()  # unchanged: the same hub, its queues kept
        assert daemon.notifications is first
        _config(tmp_path, "  ntfy:\n    chat: {preset: ntfy, url: 'http://127.0.0.1:9/t'}\n")
        daemon.reload()
        assert daemon.notifications is first  # in place: one subscription, no duplicates
        assert [n.name for n in daemon.notifications.notifiers] == ["ntfy"]
        assert daemon.metrics_snapshot().notifications_queued == {"ntfy": 0}
    finally:
        daemon.shutdown()


def test_stop_takes_what_was_published_and_gives_up_on_a_dead_receiver_in_time() -> None:
    events = EventLog()
    notifier = Notifier("chat", Chat("http://127.0.0.1:9/"), ("opened",))  # discard: refused
    hub = Notifications((notifier,), events, host="gate1")
    hub.start()
    events.event("opened", door="ssh", address="198.18.1.7")
    started = time.monotonic()
    hub.stop(0.5)
    assert time.monotonic() - started < 1.5
    totals, queued = hub.counts()
    assert totals[("chat", "sent")] == 0 and totals[("chat", "dropped")] == 1
    assert queued == {"chat": 0}
