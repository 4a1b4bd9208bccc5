// Drives headless Chromium for tests/test_browser.py.
//
// Usage: node driver.mjs '<json>' with {"page": URL of page.html, "server":
// "http://127.0.0.1:PORT", "ws": "ws://127.0.0.1:PORT/ws", "project": id}.
//
// Two pages (A and B) join one project through /client.js and exchange
// events.  Then the driver asks the trial test (a line {"need": "stop"} on
// stdout, answered by "stop-done" on stdin) to stop the server, lets page A
// send while the server is down, asks for a restart on the same port, and
// checks that every event reaches the other page once and in order.  The
// last line is "RESULT <json>".  Every wait is bounded.

import { chromium } from "playwright-core";
import { LAUNCH_ARGS, WAIT_MS, finish, need } from "./common.mjs";

const config = JSON.parse(process.argv[2]);

const started = Date.now();

function step(name) {
  console.log(JSON.stringify({ step: name, ms: Date.now() - started }));
}

/** Wait until fn(arg) is true in the page; a timeout names what was awaited. */
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 10 });
  } catch (error) {
    const log = await page.evaluate(() => window.hr && window.hr.log).catch(() => null);
    throw new Error(`timed out waiting for ${what}; page log: ${JSON.stringify(log)}`);
  }
}

const result = { ok: false };
step("start");
let browser;
let failure = null;
try {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: LAUNCH_ARGS });
  const pages = {};
  for (const name of ["A", "B"]) {
    // One context per page: each is its own browser "profile", as two users are.
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("console", (m) => console.error(`[page ${name}] ${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => console.error(`[page ${name}] error: ${e.message}`));
    const query = new URLSearchParams({
      name, server: config.server, ws: config.ws, project: config.project,
    });
    await page.goto(`${config.page}?${query}`);
    pages[name] = page;
  }
  const { A, B } = pages;
  const both = [A, B];
  for (const page of both) {
    await until(page, "open with two members",
      () => window.hr && window.hr.client.state === "open" && window.hr.log.presence.at(-1) === 2);
  }
  result.createClientIsExported = await A.evaluate(() => window.hr.createClientIsExported);
  step("joined");

  // 1. Both pages send, interleaved, while everything is up.
  for (let i = 0; i < 5; i++) {
    await A.evaluate(() => window.hr.send());
    await B.evaluate(() => window.hr.send());
  }
  await until(A, "B's first events", () => window.hr.log.received.length >= 5);
  await until(B, "A's first events", () => window.hr.log.received.length >= 5);
  step("exchanged");

  // 2. Page A sends on a timer from here to the end.  Without ACKs (a v2
  // feature this server lacks) an event written in the instant the server
  // closes is lost, so A pauses across the SIGTERM itself; it sends while
  // the server is down, while it restarts and after it is back.
  await A.evaluate(() => window.hr.closeGate());
  await need("stop");
  for (const page of both) {
    await until(page, "reconnecting after the stop",
      () => window.hr.client.state === "reconnecting" && window.hr.log.disconnects.length > 0);
  }
  step("server-stopped");
  await A.evaluate(() => window.hr.startSending(20));
  await until(A, "events queued while offline", () => window.hr.client.queued >= 5);
  const presenceBefore = await B.evaluate(() => window.hr.log.presence.length);
  await need("start");
  // B rejoins by itself; A's socket reconnects too but its token waits on the gate.
  await until(B, "B back in the room",
    (n) => window.hr.client.state === "open" && window.hr.log.presence.length > n, presenceBefore);
  step("b-rejoined");
  result.queuedAtReconnect = await A.evaluate(() => window.hr.client.queued);
  await A.evaluate(() => window.hr.openGate());
  await until(A, "A back in the room", () => window.hr.client.state === "open" && window.hr.client.queued === 0);
  await until(B, "two members again", () => window.hr.log.presence.at(-1) === 2);
  const sentAtOpen = await A.evaluate(() => window.hr.log.sent.length);
  await until(A, "live events after the restart", (n) => window.hr.log.sentOk.length >= n + 5, sentAtOpen);
  await A.evaluate(() => window.hr.stopSending());
  step("a-done");

  // 3. B answers after the restart, and everything settles.
  for (let i = 0; i < 3; i++) await B.evaluate(() => window.hr.send());
  const sentByA = await A.evaluate(() => window.hr.log.sent.length);
  await until(B, "all of A's events", (n) => window.hr.log.received.length >= n, sentByA);
  await until(A, "all of B's events", () => window.hr.log.received.length >= 8);
  // A round trip through the server after the last events, so that a
  // duplicate, had there been one, would have arrived by now.
  await A.evaluate(() => window.hr.send());
  await until(B, "A's last event", (n) => window.hr.log.received.length >= n + 1, sentByA);
  for (const [name, page] of Object.entries(pages)) {
    result[name] = await page.evaluate(() => ({ ...window.hr.log, finalState: window.hr.client.state }));
  }
  result.ok = true;
  step("done");
} catch (error) {
  failure = error;
} finally {
  await finish(browser, result, failure);
}
