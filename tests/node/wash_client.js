// A stock socket.io-client, as a front end would use it: prints every `wash:status` event as one
// JSON line on stdout; "connected" once connected. Exits when stdin closes.
const { io } = require("socket.io-client");
const url = process.argv[2];
const socket = io(url, { transports: ["websocket", "polling"], reconnection: true });
socket.on("connect", () => console.log(JSON.stringify({ connected: true, transport: socket.io.engine.transport.name })));
socket.on("wash:status", (status) => console.log(JSON.stringify(status)));
socket.on("connect_error", (err) => console.error("connect_error", err.message));
process.stdin.on("end", () => { socket.close(); process.exit(0); });
process.stdin.resume();
