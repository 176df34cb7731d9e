from sim.plc import simulate_plc_main

raise SystemExit(simulate_plc_main())
