// Drives the browser client (/client.js) in Node for tests/test_client_operator.py:
// the client is revoked from one of its two rooms, reconnects, and is then
// disconnected by the operator API.
//
// Usage: node --experimental-websocket operator.mjs <client module URL> <ws URL>
// (the module is a copy of client.js named .mjs, so that Node loads it as
// an ES module).  The line protocol with the trial test is common.mjs's.
// The last line is "RESULT <json>".  Every wait is bounded.

import { WAIT_MS, closeInput, need } from "../browser/common.mjs";

const [moduleUrl, wsUrl] = process.argv.slice(2);
const { HappyRobotClient, CLOSE_USER_DISCONNECTED } = await import(moduleUrl);

const log = { revoked: [], terminated: [], states: [], errors: [], rejoins: [] };
const result = { ok: false, log };

/** Resolves once fn() is true (checked every 10 ms), or fails after WAIT_MS. */
function until(what, fn) {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const check = () => {
      if (fn()) resolve();
      else if (Date.now() - started > WAIT_MS) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(check, 10);
    };
    check();
  });
}

try {
  const client = new HappyRobotClient(wsUrl, {
    userId: "user_n", reconnect: { baseMs: 20, maxMs: 50 },
  });
  const rooms = new Set();
  client.on("USER_PRESENCE", (m) => rooms.add(m.payload.projectId));
  client.on("revoked", (event) => log.revoked.push(event));
  client.on("terminated", (event) => log.terminated.push(event));
  client.on("state", (event) => log.states.push(event.state));
  client.on("ERROR", (m) => log.errors.push(m.code));
  client.on("rejoin", (event) => log.rejoins.push(event.projectId));
  await client.connect();
  client.join("p1");
  client.join("p2");
  await until("both rooms joined", () => rooms.has("p1") && rooms.has("p2"));

  await need("revoke");
  await until("the revoked event", () => log.revoked.length === 1);
  result.roomsAfterRevoke = client.rooms;

  // A dropped connection: the client reconnects and joins its rooms again.
  client._ws.close(4000, "test");
  await until("open again", () => log.states.filter((s) => s === "open").length === 2);
  await need("reconnected");

  await need("disconnect");
  await until("the terminated event", () => log.terminated.length === 1);
  await new Promise((resolve) => setTimeout(resolve, 300)); // time enough to reconnect, were it to
  result.finalState = client.state;
  result.closeCode = CLOSE_USER_DISCONNECTED;
  result.ok = true;
} catch (error) {
  result.error = String(error && error.stack ? error.stack : error);
} finally {
  console.log("RESULT " + JSON.stringify(result));
  process.exitCode = result.ok ? 0 : 1;
  closeInput();
}
