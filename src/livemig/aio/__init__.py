"""asyncio adapters: the only place livemig touches sockets, TLS and the loop."""
