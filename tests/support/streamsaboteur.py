"""A TCP relay that harms one connection of a migration: a chosen bulk stream
(or the control channel) is reset or has one byte flipped, the others flow on.
"""
import asyncio

from support.relay import LOCAL, Relay


class StreamSaboteur(Relay):
    """A TCP relay to the destination that harms one connection: the
    ``victim``-th accepted (1 is the control channel, 2.. the bulk streams),
    once ``after_bytes`` bytes of the ``watch``-th (the victim itself unless
    given) went from the source: ``corrupt`` flips one payload byte of the
    victim, ``cut`` resets it. Connections made after the harm flow untouched
    (the link came back)."""

    def __init__(self, target_port: int, *, victim: int, after_bytes: int, action: str,
                 watch: int | None = None):
        super().__init__()
        if action == "corrupt" and watch not in (None, victim):
            raise ValueError("a corrupted byte is one of the watched connection's")
        self.target_port = target_port
        self.victim = victim
        self.watch = victim if watch is None else watch
        self.after_bytes = after_bytes
        self.action = action
        self.accepted = 0
        self.harmed = asyncio.Event()
        self._pairs: dict[int, tuple] = {}

    async def _accept(self, c_reader, c_writer):
        self.accepted += 1
        index = self.accepted
        s_reader, s_writer = await asyncio.open_connection(LOCAL, self.target_port)
        self._writers += [c_writer, s_writer]
        self._pairs[index] = (c_writer, s_writer)
        for reader, writer, up in ((c_reader, s_writer, True), (s_reader, c_writer, False)):
            self._spawn(self._pump(reader, writer, index if up else 0, (c_writer, s_writer)))

    async def _pump(self, reader, writer, index: int, pair):
        sent = 0
        try:
            while data := await reader.read(1 << 16):
                if index == self.watch and not self.harmed.is_set() \
                        and sent + len(data) > self.after_bytes:
                    cut_at = self.after_bytes - sent
                    if self.action == "cut":
                        if self.victim == self.watch:
                            writer.write(data[:cut_at])
                            await writer.drain()
                        self.harmed.set()
                        for w in self._pairs.get(self.victim, ()):
                            w.transport.abort()
                        if self.victim == self.watch:
                            return
                    else:
                        data = bytearray(data)
                        data[cut_at] ^= 0x10
                        self.harmed.set()
                writer.write(data)
                sent += len(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            for w in pair:
                w.transport.abort()
