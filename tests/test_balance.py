"""Connection balancing between workers, over a real shared memory map and trio's
autojump clock: a worker over its share defers, but never longer than PATIENCE_S."""

from __future__ import annotations

import mmap

import trio
import trio.testing

from mwdlogd.servers.balance import ABSENT, PATIENCE_S, Balance, board_size


def pair() -> tuple[Balance, Balance]:
    board = mmap.mmap(-1, board_size(2))
    return Balance(board, "http", 0, 2), Balance(board, "http", 1, 2)


async def test_a_worker_over_its_share_waits_until_the_other_catches_up(
        autojump_clock: trio.testing.MockClock) -> None:
    first, second = pair()
    await first.my_turn()  # equal counts: both may accept
    first.opened()
    async with trio.open_nursery() as nursery:
        turn = trio.Event()

        async def wait_turn() -> None:
            await first.my_turn()
            turn.set()

        nursery.start_soon(wait_turn)
        await trio.sleep(PATIENCE_S / 5)
        assert not turn.is_set()
        second.opened()  # the other worker took the next connection
        await turn.wait()
        assert trio.current_time() < PATIENCE_S
    assert (first.connections, second.connections) == (1, 1)
    first.closed()
    assert first.connections == 0


async def test_a_stuck_worker_delays_the_others_at_most_patience(
        autojump_clock: trio.testing.MockClock) -> None:
    first, _ = pair()
    first.opened()
    started = trio.current_time()
    await first.my_turn()
    assert trio.current_time() - started >= PATIENCE_S * 0.99


async def test_nobody_waits_for_a_worker_that_is_gone(
        autojump_clock: trio.testing.MockClock) -> None:
    board = mmap.mmap(-1, board_size(2))
    first = Balance(board, "forward", 0, 2)
    board[board_size(2) // 2 + 8:board_size(2)] = ABSENT.to_bytes(8, "little")
    for _ in range(5):
        first.opened()
    started = trio.current_time()
    await first.my_turn()
    assert trio.current_time() == started
