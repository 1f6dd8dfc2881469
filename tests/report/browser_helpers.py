"""Headless Chromium for the report tests (Debian's `chromium` package): run it on a page, read its console
lines; `skip_without_chromium` skips a test module, with the reason, where it is not installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
skip_without_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install it with `apt-get install -y chromium` (Debian) to run the "
                             "browser tests of lorakit report")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--enable-logging=stderr", "--v=0"]


def chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


