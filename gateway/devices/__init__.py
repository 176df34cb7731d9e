"""Devices (ESP32 payment boxes, helmet dryers): validation of what they send and their facts in the store."""
