"""The application: one config model, wiring, lifecycle, supervisor, logs."""
