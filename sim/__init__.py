"""Simulators and test counterparts that stand apart from the product (not in the .deb).

`sim.plc_umodbus` is a washbay-v1 PLC written from the register map on another Modbus stack than
the gateway's (umodbus instead of pymodbus), so the tests talk to a counterpart that does not share
the gateway's assumptions. `sim.control` is the small control protocol both PLC simulators speak
when they run as their own process.
"""
