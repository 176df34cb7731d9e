"""Simulators and test counterparts, apart from the product: what stands in for the site's other
parts on a developer's machine, in the tests, the benchmarks and the demo.

- `sim.plc`: the project's washbay-v1 PLC simulator (pymodbus server; RTU on a pty, TCP);
  `sim.pty`: the socat pty pair that stands in for an RS485 adapter.
- `sim.plc_umodbus`: an independent washbay-v1 PLC on another Modbus stack (umodbus), written
  from the register map, with real PLCs' quirks; `sim.control`: the control protocol both PLC
  simulators speak when they run as their own process.
- `sim.fleet`: simulated ESP32 devices (MQTT and HTTP, as firmware does).
- `sim.cloud`: the company cloud (uplink batches, payments, the bridge's far side).
- `sim.demo`: a whole site on 127.0.0.1 (`carwash-gateway demo`); `sim.procs`: starting gateway
  processes outside systemd and waiting for their readiness.

The product (`gateway`, `plc`, `web`) never imports this package, except the CLI's `demo`,
`simulate-plc` and `simulate-devices` subcommands, lazily.
"""
