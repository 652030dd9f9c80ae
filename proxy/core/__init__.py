"""The sans-I/O core: no asyncio, no sockets (tests/test_architecture.py checks)."""
