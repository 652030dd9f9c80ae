"""The echo service and the demo: examples, outside the proxy's wheel."""
