"""The relay: binds each client stream to a backend stream and moves bytes between them."""
