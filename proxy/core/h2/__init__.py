"""A lean, sans-I/O HTTP/2 codec for relaying gRPC: bytes in, events out; actions in, bytes out.

Nothing in this package imports asyncio or touches a socket.
"""
