// Drives headless Chromium for tests/test_metrics.py's dashboard test.
//
// Usage: node dashboard.mjs '<json>' with {"page": URL of /dashboard (with
// ?token= when the server has one), "screenshot": path of the PNG to write}.
//
// Opens the dashboard, reads what it shows while the server is idle, asks
// the trial test for traffic (a line {"need": "traffic"} on stdout, answered
// by "traffic-done" on stdin: clients connect and keep sending), waits until
// the page shows the new connections, a message rate and a latency, and
// saves a screenshot.  The last line is "RESULT <json>".  Every wait is bounded.

import { chromium } from "playwright-core";
import { LAUNCH_ARGS, WAIT_MS, finish, need } from "./common.mjs";

const config = JSON.parse(process.argv[2]);

/** What the page shows: its tiles' text, and the last data it fetched. */
function shown() {
  const text = (id) => document.getElementById(id).textContent;
  const d = window.dashboard.last;
  return {
    updates: window.dashboard.updates,
    connections: text("connections"),
    rooms: text("rooms"),
    rateIn: text("rate-in"),
    rateOut: text("rate-out"),
    p50: text("p50"),
    p99: text("p99"),
    roomRows: document.querySelectorAll("#room-rows tr").length,
    points: d ? d.series.t.length : 0,
    status: text("status"),
  };
}

/** Wait until fn(arg) is true in the page; a timeout says what the page showed. */
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 50 });
  } catch (error) {
    const now = await page.evaluate(shown).catch(() => null);
    throw new Error(`timed out waiting for ${what}; the page showed ${JSON.stringify(now)}`);
  }
}

const result = { ok: false, errors: [] };
let browser;
let failure = null;
try {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: LAUNCH_ARGS });
  const context = await browser.newContext({ viewport: { width: 1280, height: 540 } });
  const page = await context.newPage();
  page.on("console", (m) => console.error(`[page] ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => result.errors.push(e.message));
  // Everything the page loads must come from the server itself.
  const origin = new URL(config.page).origin;
  result.foreign = [];
  page.on("request", (r) => { if (!r.url().startsWith(origin)) result.foreign.push(r.url()); });
  await page.goto(config.page);
  await until(page, "the first update", () => window.dashboard && window.dashboard.updates >= 1);
  result.before = await page.evaluate(shown);
  result.tokenHidden = !(await page.evaluate(() => location.search.includes("token")));

  await need("traffic");
  await until(page, "three connections", () =>
    document.getElementById("connections").textContent === "3");
  await until(page, "a message rate, a latency and a few chart points", () => {
    const d = window.dashboard.last;
    return d && d.rates.messagesIn > 0 && d.latencyMs.p50 !== null && d.series.t.length >= 4
      && document.getElementById("p50").textContent !== "–";
  });
  result.after = await page.evaluate(shown);
  await page.screenshot({ path: config.screenshot, fullPage: true });
  result.ok = true;
} catch (error) {
  failure = error;
} finally {
  await finish(browser, result, failure);
}
