"""Running a :class:`~gridboost.Command` as a subprocess that cancellation really stops."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import ByteReceiveStream, Process

from ._records import Command

__all__ = ["merged_env", "run_command", "stop_process"]


def merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """The command's ``env`` laid over this machine's environment, or ``None`` to inherit it."""
    return None if env is None else {**os.environ, **env}


async def _drain(stream: ByteReceiveStream | None, into: list[bytes]) -> None:
    if stream is None:
        return
    async for chunk in stream:
        into.append(chunk)


async def stop_process(process: Process, grace: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``grace`` seconds; awaited.

    Callers run this shielded: it is the part of a cancellation that must finish.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may exit between the check and the signal
            process.terminate()
        with anyio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def run_command(
    command: Command, *, grace: float, on_spawn: Callable[[int], None] | None = None
) -> tuple[int, bytes, bytes]:
    """Run ``command``; return (status, stdout, stderr). Cancelled: the process is stopped first.

    ``on_spawn`` is told the process id as soon as the process exists.
    """
    process = await anyio.open_process(
        list(command.argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=command.cwd,
        env=merged_env(command.env),
        # Its own session, so a terminal's Ctrl-C reaches the host app, which then
        # cancels and stops the command itself, in order.
        start_new_session=True,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    if on_spawn is not None:
        on_spawn(process.pid)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, process.stdout, out)
            tg.start_soon(_drain, process.stderr, err)
            await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await stop_process(process, grace)
            await process.aclose()
    assert process.returncode is not None
    return process.returncode, b"".join(out), b"".join(err)
