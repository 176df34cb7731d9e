"""Who may do what: technician accounts and their recovery, MQTT accounts, device signatures, rate limits."""
