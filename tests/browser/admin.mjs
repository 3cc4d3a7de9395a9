// Drives the operator's page (GET /admin on the API listener) in headless Chromium.
// Run by tests/test_admin.py, which owns the daemon and the test clients: this script
// prints one JSON object per line on stdout ({"event": ...}) and takes one JSON command
// per line on stdin ({"cmd": ...}).
//
//   node admin.mjs API_BASE API_KEY SCREENSHOT_PATH [CHROMIUM]
import { commands, launch, say } from "./harness.mjs";

const [base, apiKey, screenshotPath, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const T = 20000;
async function command(name) {
  const { value, done } = await commands.next();
  const cmd = done ? null : JSON.parse(value);
  if (!cmd || cmd.cmd !== name) throw new Error(`expected command ${name}, got ${value}`);
  return cmd;
}

const browser = await launch(executablePath);
const problems = [];
const requests = [];

// The number a tile or fact shows (its data-value), once `value OP n` holds.
const OPS = new Set(["==", ">", ">="]);
async function waitValue(page, selector, op, n, what) {
  if (!OPS.has(op)) throw new Error(`unknown op ${op}`);
  try {
    await page.waitForFunction(
      ([sel, o, want]) => {
        const node = document.querySelector(sel);
        const v = node && node.dataset.value !== "" ? Number(node.dataset.value) : NaN;
        if (Number.isNaN(v)) return false;
        return o === "==" ? v === want : o === ">" ? v > want : v >= want;
      },
      [selector, op, n], { timeout: T, polling: 100 });
  } catch (e) {
    const now = await page.$eval(selector, (node) => node.dataset.value).catch(() => "(missing)");
    throw new Error(`${what}: ${selector} never became ${op} ${n} (shows ${now})`);
  }
  return Number(await page.$eval(selector, (node) => node.dataset.value));
}

const rows = (page) => page.$$eval("#u-conns tbody tr[data-conn]", (trs) => trs.map((tr) => ({
  conn: tr.dataset.conn, cells: [...tr.cells].slice(0, 5).map((td) => td.textContent.trim()),
})));

try {
  const context = await browser.newContext({ viewport: { width: 1360, height: 1000 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // the 401/403 of the wrong key are expected; anything else red is a problem
    if (m.type() === "error" && !/\b(401|403)\b/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on("request", (r) => requests.push(new URL(r.url()).pathname));
  const response = await page.goto(base + "/admin", { timeout: T });
  const csp = response.headers()["content-security-policy"] || "";
  await page.waitForSelector("#key-form:not([hidden])", { timeout: T });

  // a wrong key: the page says so and asks again
  await page.fill("#key", "not-the-key");
  await page.click("#key-submit");
  await page.waitForSelector("#key-error:not([hidden])", { timeout: T });
  const refused = await page.textContent("#key-error");
  await page.fill("#key", apiKey);
  await page.click("#key-submit");
  await page.waitForSelector('#status[data-status="live"]', { timeout: T });
  const stored = await page.evaluate(() => sessionStorage.getItem("tidings-admin-key"));
  const before = await waitValue(page, "#v-connections", ">=", 0, "connections");
  say("live", { csp, refused, keyStored: stored === apiKey, connections: before,
                offline: requests.filter((p) => !p.startsWith("/admin") && !p.startsWith("/api/")) });

  const watch = await command("watch");
  const counters = {
    connections: await waitValue(page, "#v-connections", "==", watch.connections, "connections"),
    users: await waitValue(page, "#v-users", "==", watch.users, "users"),
    in: await waitValue(page, "#v-in", ">", 0, "messages in /s"),
    out: await waitValue(page, "#v-out", ">", 0, "messages out /s"),
    limited: await waitValue(page, "#v-limited", ">=", watch.rate_limited, "rate-limited"),
    commit: await waitValue(page, "#v-commit", ">", 0, "commit latency"),
  };
  await page.waitForSelector(`#top-users tr[data-user="${watch.top}"]`, { timeout: T });
  await page.waitForSelector(`#warnings li.warning:has-text("${watch.warning}")`, { timeout: T });
  say("counters", counters);

  const lookup = await command("lookup");
  await page.click(`#top-users tr[data-user="${lookup.user}"] a`);  // the lookup from the list
  await page.waitForSelector(`#user[data-user="${lookup.user}"]`, { timeout: T });
  await page.waitForFunction((n) => document.querySelectorAll("#u-conns tbody tr[data-conn]").length === n,
                             lookup.connections, { timeout: T });
  const facts = {
    online: await page.textContent("#u-online"),
    count: await waitValue(page, "#u-count", "==", lookup.connections, "user connections"),
    unread: await waitValue(page, "#u-unread", "==", lookup.unread, "unread"),
    devices: await page.$$eval("#u-devices .chip", (cs) => cs.map((c) => c.textContent)),
  };
  await page.waitForTimeout(1600);  // one more poll: the charts are drawn to the right edge
  await page.screenshot({ path: screenshotPath, fullPage: true });
  say("looked_up", { facts, rows: await rows(page) });

  const one = await command("disconnect_one");
  await page.click(`#u-conns tr[data-conn="${one.conn}"] button.disconnect`);
  await page.waitForFunction((c) => !document.querySelector(`#u-conns tr[data-conn="${c}"]`) &&
                                    document.querySelectorAll("#u-conns tbody tr[data-conn]").length > 0,
                             one.conn, { timeout: T });
  say("disconnected_one", { rows: await rows(page) });

  await command("disconnect_all");
  await page.click("#disconnect-all");
  await waitValue(page, "#u-count", "==", 0, "connections after disconnect all");
  await page.waitForSelector("#u-online:has-text('offline')", { timeout: T });
  say("disconnected_all", { rows: await rows(page) });

  // A hidden tab asks for nothing: the page pauses until it is visible again.
  await page.evaluate(() => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await page.waitForSelector('#status[data-status="paused"]', { timeout: T });
  const n = requests.length;
  await page.waitForTimeout(3500);
  say("result", { problems, requestsWhileHidden: requests.length - n });
} catch (e) {
  say("failed", { error: String(e && e.stack || e), problems });
} finally {
  await browser.close();
}
