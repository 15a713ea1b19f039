"""Processes that hold or wait for a build lock: spawned by tests, so this module imports
nothing heavy (a spawned child imports the module of its target first)."""

from __future__ import annotations

import os

from tlray.data.atomic import build_lock


def hold_the_lock(uri: str, held, release, die: bool) -> None:
    with build_lock(uri):
        held.set()
        if die:
            os._exit(1)  # a build that dies, lock in hand
        release.wait()


def wait_for_the_lock(uri: str, waiting, got) -> None:
    with build_lock(uri, on_wait=waiting.set):
        got.set()
