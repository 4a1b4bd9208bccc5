// What both browser drivers share: Chromium's launch flags for this
// machine, the bounded wait, and the line protocol with the trial test
// (a JSON line {"need": what} on stdout, answered by "<what>-done" on stdin).

import readline from "node:readline";

export const WAIT_MS = 20000;
export const LAUNCH_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const stdin = readline.createInterface({ input: process.stdin });
const answers = [];
const waiting = [];
stdin.on("line", (line) => (waiting.length ? waiting.shift()(line) : answers.push(line)));

/** Ask the trial test to do something, and wait for its "<what>-done". */
export async function need(what) {
  console.log(JSON.stringify({ need: what }));
  let timer;
  const line = answers.length
    ? answers.shift()
    : await Promise.race([
        new Promise((resolve) => waiting.push(resolve)),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer to ${what}`)), WAIT_MS);
        }),
      ]).finally(() => clearTimeout(timer));
  if (line !== `${what}-done`) throw new Error(`asked for ${what}, got ${line}`);
}

/** Let the process end once the driver is done with stdin. */
export function closeInput() {
  stdin.close();
}

/** The end of every driver: close the browser, print the RESULT line the trial test reads. */
export async function finish(browser, result, error) {
  if (error) result.error = String(error && error.stack ? error.stack : error);
  if (browser) await browser.close().catch(() => {});
  console.log("RESULT " + JSON.stringify(result));
  process.exitCode = result.ok ? 0 : 1;
  closeInput();
}
