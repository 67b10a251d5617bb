"""fleet.password_file is read by the rule the bundled Redis image applies to the same file
(compose/redis/entrypoint.sh): one line, a final LF or CRLF not part of it, anything else
refused. Different rules would hash one password in Redis and send another (AUTH fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.fleet.redis_store import read_password
from appliance.fleet.store import FleetUnreachable

PASSWORD = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("text", [PASSWORD, PASSWORD + "\n", PASSWORD + "\r\n"])
def test_one_line_with_or_without_its_newline_is_the_password(tmp_path: Path, text: str) -> None:
    path = tmp_path / "password"
    path.write_bytes(text.encode())
    assert read_password(str(path)) == PASSWORD


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (PASSWORD + "\n" + PASSWORD + "\n", "more than one line"),
        (PASSWORD + "\n\n", "more than one line"),
        (" " + PASSWORD + "\n", "spaces around"),
        (PASSWORD + " \n", "spaces around"),
    ],
)
def test_a_second_line_or_surrounding_spaces_are_refused(
    tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "password"
    path.write_bytes(text.encode())
    with pytest.raises(FleetUnreachable, match=said):
        read_password(str(path))


def test_no_file_is_no_password_and_a_missing_file_is_an_error(tmp_path: Path) -> None:
    assert read_password(None) is None
    with pytest.raises(FleetUnreachable, match="password_file"):
        read_password(str(tmp_path / "missing"))
