"""QR payments (device-api.md §3): the cloud's payments API, and the core's follower of charges."""
