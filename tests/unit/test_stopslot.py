"""One stop at a time: the slot a host's outgoing migrations share."""
import asyncio

from livemig.engine.source.stopslot import StopSlot


def test_one_holder_and_others_held_back_until_it_gives_back():
    async def main():
        slot, a, b = StopSlot(), object(), object()
        assert slot.try_take(a) and slot.try_take(a)      # re-entrant for its holder
        assert not slot.try_take(b)
        await asyncio.wait_for(slot.let_pass(a), 1)       # the holder never waits
        waiter = asyncio.ensure_future(slot.let_pass(b))
        await asyncio.sleep(0)
        assert not waiter.done()
        slot.give_back(b)                                 # not the holder: no effect
        await asyncio.sleep(0)
        assert not waiter.done()
        slot.give_back(a)
        await asyncio.wait_for(waiter, 5)
        assert slot.holder is None and slot.try_take(b)

    asyncio.run(main())
