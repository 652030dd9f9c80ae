"""Units for configuration values, so that a number says what it measures."""

BYTES = 1
KiB = 1024 * BYTES
MiB = 1024 * KiB

SECONDS = 1.0
MILLISECONDS = SECONDS / 1000
