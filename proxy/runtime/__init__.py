"""asyncio adapters around the core: listeners, client and backend connections, the pool."""
