// Drives the demo page in a Chromium that test_browser_e2e.py started (and stops): connects
// over CDP, sends one message, disturbs the turn mid-reply, waits for the page to finish it,
// and reports what it saw. The assertions are the Python test's.
//
//   node drive.mjs '{"cdpUrl": "ws://…", "baseUrl": "http://127.0.0.1:…", "scenario": "cut",
//                    "message": "…", "screenshot": "/tmp/….png"}'
//
// It talks to the test in JSON lines: on stdout {"ask": "cut"} (the test cuts every
// connection at its proxy, then answers with a line on stdin) and, last, {"result": {…}}.
//
// Scenarios:
//   cut     every connection is cut mid-turn; the page's EventSource must reconnect by itself
//           with Last-Event-ID. (DevTools' offline emulation cannot do this: it fails new
//           requests only, and a response already streaming goes on streaming.)
//   reload  the page is reloaded mid-turn and must resume the unfinished turn.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const options = JSON.parse(process.argv[2]);
const CUT_AFTER_SEQ = 8; // disturb the turn once the page holds this many events
const FINISH_TIMEOUT_MS = 20_000;
const SAMPLE_EVERY_MS = 15;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (message) => process.stdout.write(JSON.stringify(message) + "\n");

// Asks the test to do something and waits for its answer line.
async function ask(what) {
  say({ ask: what });
  const { value, done } = await stdinLines.next();
  if (done) throw new Error("the test closed stdin instead of answering " + what);
  return value;
}

async function waitFor(what, predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let value;
    try {
      value = await predicate();
    } catch (err) {
      value = undefined; // the page is navigating (reload): ask again
    }
    if (value) return value;
    if (Date.now() > deadline) throw new Error("timed out waiting for " + what);
    await sleep(SAMPLE_EVERY_MS);
  }
}

// What the page shows, read in one round trip.
const snapshot = (page) =>
  page.evaluate(() => ({
    live: Array.from(document.querySelectorAll(".assistant.live .text"), (e) => e.textContent),
    users: Array.from(document.querySelectorAll(".turn.user .text"), (e) => e.textContent),
    assistants: Array.from(document.querySelectorAll(".turn.assistant .text"), (e) => e.textContent),
    notes: Array.from(document.querySelectorAll(".turn .note"), (e) => e.textContent),
    transcript: document.getElementById("transcript").textContent,
    execution: document.getElementById("execution").textContent,
    mode: document.getElementById("mode").textContent,
    seq: document.getElementById("seq").textContent,
    reconnects: document.getElementById("reconnects").textContent,
    state: document.getElementById("state").textContent,
    busy: document.getElementById("send").disabled,
  }));

async function main() {
  const marks = { start: Date.now() };
  const browser = await chromium.connectOverCDP(options.cdpUrl);
  marks.connected = Date.now();
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  const result = { scenario: options.scenario, requests: [], samples: [], consoleErrors: [] };
  try {
    const page = await context.newPage();
    page.on("console", (msg) => {
      if (msg.type() === "error") result.consoleErrors.push(msg.text());
    });
    page.on("pageerror", (err) => result.consoleErrors.push(String(err)));
    // Every request the page makes, with the headers the browser really sent: the witness
    // that EventSource's own reconnect carried Last-Event-ID.
    page.on("request", async (request) => {
      const entry = { method: request.method(), url: request.url(), lastEventId: null, t: Date.now() };
      result.requests.push(entry);
      const headers = await request.allHeaders().catch(() => ({}));
      entry.lastEventId = headers["last-event-id"] ?? null;
    });

    await page.goto(options.baseUrl + "/", { waitUntil: "load" });
    marks.loaded = Date.now();
    await page.fill("#message", options.message);
    await page.click("#send");

    // Sample the live reply for the whole turn: each sample must be a prefix of the reply.
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        try {
          const shown = await snapshot(page);
          for (const text of shown.live) result.samples.push(text);
        } catch (err) {
          // navigating
        }
        await sleep(SAMPLE_EVERY_MS);
      }
    })();

    // Polled in the page itself (fast): the cut must come while the turn is still running.
    await page.waitForFunction(
      (n) => Number(document.getElementById("seq").textContent) >= n,
      CUT_AFTER_SEQ,
      { polling: 10, timeout: FINISH_TIMEOUT_MS },
    );
    result.before = await snapshot(page);

    if (options.scenario === "cut") {
      result.cutAt = Date.now();
      result.cutAnswer = await ask("cut");
      await sleep(100);
      result.afterCut = await snapshot(page);
      await page.screenshot({ path: options.screenshot.replace(/\.png$/, "-after-cut.png") });
    } else if (options.scenario === "reload") {
      result.reloadAt = Date.now();
      await page.reload({ waitUntil: "load" });
    } else {
      throw new Error("unknown scenario " + options.scenario);
    }

    result.final = await waitFor(
      "the turn to finish on the page",
      async () => {
        const shown = await snapshot(page);
        return shown.live.length === 0 && !shown.busy && shown.assistants.length > 0 ? shown : null;
      },
      FINISH_TIMEOUT_MS,
    );
    result.finishedAt = Date.now();
    sampling = false;
    await sampler;
    marks.finished = Date.now();
    await page.screenshot({ path: options.screenshot, fullPage: true });
    marks.screenshot = Date.now();
  } finally {
    await context.close().catch(() => {});
    // Disconnects only: the browser process belongs to the Python test, which stops it.
    await browser.close().catch(() => {});
  }
  marks.closed = Date.now();
  result.marks = marks;
  say({ result });
}

main().then(
  () => process.exit(0), // stdin may still be open
  (err) => {
    process.stderr.write(((err && err.stack) || String(err)) + "\n");
    process.exit(1);
  },
);
