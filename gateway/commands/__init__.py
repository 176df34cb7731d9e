"""Device commands (device-api.md §4–§5): the catalogue, the pure tracker of pending commands,
their SSE events, persistence and the core's command service."""
