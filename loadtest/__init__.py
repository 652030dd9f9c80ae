"""Data-plane benchmark: the proxy against direct calls and HAProxy (see loadtest/README.md)."""
