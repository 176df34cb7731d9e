"""The core process: one asyncio supervisor owning every long-lived task of the gateway."""
