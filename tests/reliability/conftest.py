"""Registers the `soak` marker (long-running leak checks; see README.md)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long-running resource-leak checks (tests/reliability/soak.py)")
