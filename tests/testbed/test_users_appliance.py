"""``knockgate user`` inside the appliance container (the testbed's appliance).

``docker exec appliance knockgate user add`` writes the managed users file next to the
configuration, reloads knockgate in place (the pid its status socket reports: same pid
afterwards, one more reload) and prints the bundle with its QR code (the image's
python3-qrcode); ``user remove`` reloads again. Packets are tested in
tests/integration/test_users.py.
"""

from __future__ import annotations

import pytest

from tests.testbed.test_appliance_signals import (  # the module-scoped fixtures come along
    Appliance,
    appliance,  # noqa: F401 (a fixture)
)
from tests.testbed.test_testbed import (
    APPLIANCE_CONFIG,
    GATEWAY,
    testbed,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.testbed

USER = "kgtb-user"
USERS_FILE = "/etc/knockgate/knockgate-users.yaml"


def test_user_add_and_remove_reload_the_appliance_in_place(
    appliance: Appliance,  # noqa: F811
) -> None:
    bed = appliance.bed
    before = appliance.status()
    user = ["knockgate", "user"]
    add = [*user, "add", USER, "--door", "web-spa", "--host", GATEWAY, "--config", APPLIANCE_CONFIG]
    try:
        added = bed.exec("appliance", *add)
        assert added.returncode == 0, added.stdout + added.stderr + bed.log_tail()
        assert f"knockgate (pid {before['pid']}) reloaded" in added.stderr
        assert "[web-spa]" in added.stdout and f"knockgate://{GATEWAY}/web-spa?v=1" in added.stdout
        assert "█" in added.stdout  # the QR code: python3-qrcode is in the image
        # Readable by the monitor (user knockgate) through the config group, writable by root.
        mode = bed.exec("appliance", "stat", "-c", "%a %U %G", USERS_FILE, check=True).stdout
        assert mode.split() == ["640", "root", "knockgate-config"]
        listed = bed.exec("appliance", *user, "list", "--config", APPLIANCE_CONFIG, check=True)
        assert f"{USER}  doors: web-spa  added: " in listed.stdout
        after = appliance.status()
        assert after["pid"] == before["pid"]
        assert after["counters"]["reloads"] == before["counters"]["reloads"] + 1
        removed = bed.exec("appliance", *user, "remove", USER, "--config", APPLIANCE_CONFIG)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert f"knockgate (pid {before['pid']}) reloaded" in removed.stderr
    finally:
        bed.exec("appliance", "rm", "-f", USERS_FILE)
