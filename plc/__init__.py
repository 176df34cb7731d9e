"""The Modbus side of the gateway: buses, PLC register profiles and the PLC simulator.

pymodbus is imported only inside this package; the rest of the gateway sees plain Python types.
The bridge itself arrives with the wash-bay issue; the foundation only validates the bus and bay
configuration (see gateway.config).
"""
