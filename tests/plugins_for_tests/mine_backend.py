"""A plugin that provides the backend ``"mine"``: the local backend under a new name, with one option of its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gridboost
from gridboost._local import LocalBackend


class MineBackend(LocalBackend):
    """The local backend, renamed, remembering the ``flavour`` it was made with."""

    name = "mine"

    def __init__(self, *, flavour: str = "plain", **options: Any) -> None:
        super().__init__(**options)
        self.flavour = flavour


@gridboost.hookimpl
def gridboost_backends() -> Iterator[gridboost.BackendSpec]:
    yield gridboost.BackendSpec(
        name="mine",
        factory=MineBackend,
        description="this machine, under another name",
        options={"flavour": "a word the backend remembers", "capacity": "what to account against"},
    )
