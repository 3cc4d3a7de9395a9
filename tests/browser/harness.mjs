// What demo.mjs and admin.mjs share: the JSON-lines channel to the Python test that runs
// them (events out on stdout, commands in on stdin) and how Chromium is launched.
import readline from "node:readline";
import { chromium } from "playwright-core";

/** Print one event for the test: a JSON object on a line of its own. */
export const say = (event, extra = {}) => console.log(JSON.stringify({ event, ...extra }));

/** The test's commands, one stdin line each (an async iterator of strings). */
export const commands = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Headless Chromium from `executablePath`, with nothing that reaches the network. */
export function launch(executablePath) {
  return chromium.launch({
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage"],
  });
}
