"""Fixtures for the training tests: the token cache (train/cache.py) goes to a temporary directory, never to
the user's ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path_factory.mktemp("token-cache")))
