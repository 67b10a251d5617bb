"""The daemon: one loop owns the engine; capture, address and status threads only enqueue."""
