// Drives the demo page in a Chromium that test_browser_e2e.py started (and stops): connects
// over CDP, sends one message, disturbs the turn mid-reply, waits for the page to finish it,
// and reports what it saw. The assertions are the Python test's.
//
//   node drive.mjs '{"cdpUrl": "ws://…", "baseUrl": "http://127.0.0.1:…", "scenario": "cut",
//                    "message": "…", "screenshot": "/tmp/….png", "speed": {"tokens": 9,
//                    "delay": 20}, "midScreenshot": "/tmp/….png"}'
//
// It talks to the test in JSON lines: on stdout {"ask": "cut"} (the test cuts every
// connection at its proxy, then answers with a line on stdin) and, last, {"result": {…}}.
//
// Scenarios:
//   cut     every connection is cut mid-turn; the page must resume with Last-Event-ID. (DevTools'
//           offline emulation cannot do this: it fails new requests only, and a response
//           already streaming goes on streaming.)
//   drop    "Drop connection" is clicked mid-turn: the page closes its stream and resumes.
//   reload  the page is reloaded mid-turn and must resume the unfinished turn (joined).
//   replay  the page is left mid-turn and opened again once the turn has ended (replayed).
//   speed   nothing disturbs the turn: it runs at the speed set on the page ("speed" option).
//   switch  mid-turn, the user is switched to bob (who must not see guest's turn), then back.
//   kill    mid-turn, "Kill this worker" is clicked; another worker must take the turn over.
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
    resumedFrom: document.getElementById("resumed-from").textContent,
    worker: document.getElementById("worker").textContent,
    connections: Array.from(document.querySelectorAll("#connections li"), (e) => ({
      reason: e.dataset.reason, after: Number(e.dataset.after), mode: e.dataset.mode,
      worker: e.dataset.worker, text: e.textContent,
    })),
    isolation: document.getElementById("isolation").textContent,
    user: document.getElementById("user").value,
    tenant: document.getElementById("tenant").value,
    tokens: document.getElementById("tokens").value,
    delay: document.getElementById("delay").value,
    duration: document.getElementById("duration").textContent,
    workersShown: !document.getElementById("workers-bar").hidden,
    killShown: !document.getElementById("kill").hidden,
    owner: document.getElementById("owner").textContent,
    state: document.getElementById("state").textContent,
    busy: document.getElementById("send").disabled,
  }));

// Polled in the page itself (fast): the disturbance must come while the turn still runs.
const waitForSeq = (page, n) =>
  page.waitForFunction((n) => Number(document.getElementById("seq").textContent) >= n, n, {
    polling: 10,
    timeout: FINISH_TIMEOUT_MS,
  });

const waitForConnections = (page, n) =>
  waitFor(
    n + " connections on the page",
    async () => (await snapshot(page)).connections.length >= n,
    FINISH_TIMEOUT_MS,
  );

const scenarios = {
  async cut(page, result) {
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    result.cutAt = Date.now();
    result.cutAnswer = await ask("cut");
    await waitForConnections(page, 2);
    result.afterCut = await snapshot(page);
  },
  async drop(page, result) {
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    await page.click("#drop");
    await waitForConnections(page, 2);
  },
  async reload(page, result) {
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    result.reloadAt = Date.now();
    await page.reload({ waitUntil: "load" });
    await waitForConnections(page, 2);
    result.resumed = await snapshot(page);
    if (options.midScreenshot) {
      // Mid-turn, after the resume: the picture the README shows.
      await sleep(600);
      await page.screenshot({ path: options.midScreenshot });
    }
  },
  async replay(page, result) {
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    result.leftAt = Date.now();
    await page.goto("about:blank");
    // Come back only once the server says the turn has ended.
    const url = options.baseUrl + "/turns/" + encodeURIComponent(result.before.execution);
    await waitFor(
      "the turn to end on the server",
      async () => (await (await fetch(url)).json()).status === "completed",
      FINISH_TIMEOUT_MS,
    );
    result.backAt = Date.now();
    await page.goto(options.baseUrl + "/", { waitUntil: "load" });
  },
  async speed(page, result) {
    result.before = await snapshot(page);
  },
  async switch(page, result) {
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    await page.selectOption("#user", "bob");
    await waitFor("the isolation probe", async () => (await snapshot(page)).isolation !== "", FINISH_TIMEOUT_MS);
    result.asBob = await snapshot(page);
    await page.selectOption("#tenant", "acme");
    await page.selectOption("#user", "guest");
    await waitFor(
      "the isolation probe as guest@acme",
      async () => (await snapshot(page)).isolation.startsWith("as guest@acme"),
      FINISH_TIMEOUT_MS,
    );
    result.asOtherTenant = await snapshot(page);
    await page.selectOption("#tenant", "demo");
    result.switchedBackAt = Date.now();
  },
  async kill(page, result) {
    // The button is enabled once the page knows which worker holds the turn's lease.
    await page.waitForSelector("#kill:not([disabled])", { timeout: FINISH_TIMEOUT_MS });
    await waitForSeq(page, CUT_AFTER_SEQ);
    result.before = await snapshot(page);
    result.killAt = Date.now();
    await page.click("#kill");
    await waitFor(
      "the kill on the page",
      async () => (await snapshot(page)).connections.some((c) => c.reason === "kill"),
      FINISH_TIMEOUT_MS,
    );
    result.afterKill = await snapshot(page);
    if (options.midScreenshot) {
      // Mid-turn, once another worker restarted it: the picture the README shows.
      await waitFor(
        "the takeover on the page",
        async () => (await snapshot(page)).connections.some((c) => c.reason === "takeover"),
        FINISH_TIMEOUT_MS,
      );
      await waitForSeq(page, (await snapshot(page)).connections.at(-1).after + 12);
      await waitFor("the new owner", async () => (await snapshot(page)).owner.endsWith("attempt 2"), FINISH_TIMEOUT_MS);
      const bottom = await page.evaluate(() => document.getElementById("composer").getBoundingClientRect().bottom);
      await page.screenshot({ path: options.midScreenshot, clip: { x: 0, y: 0, width: 900, height: Math.ceil(bottom) + 16 }, animations: "disabled" });
    }
  },
};

async function main() {
  const marks = { start: Date.now() };
  const scenario = scenarios[options.scenario];
  if (!scenario) throw new Error("unknown scenario " + options.scenario);
  const browser = await chromium.connectOverCDP(options.cdpUrl);
  marks.connected = Date.now();
  const context = await browser.newContext({ viewport: { width: 900, height: 760 } });
  const result = { scenario: options.scenario, requests: [], samples: [], consoleErrors: [] };
  try {
    const page = await context.newPage();
    page.on("console", (msg) => {
      if (msg.type() === "error") result.consoleErrors.push(msg.text());
    });
    page.on("pageerror", (err) => result.consoleErrors.push(String(err)));
    // Every request the page makes, with the headers the browser really sent.
    page.on("request", async (request) => {
      const entry = { method: request.method(), url: request.url(), lastEventId: null, user: null, t: Date.now() };
      result.requests.push(entry);
      const headers = await request.allHeaders().catch(() => ({}));
      entry.lastEventId = headers["last-event-id"] ?? null;
      entry.user = headers["x-demo-user"] ?? null;
      entry.tenant = headers["x-demo-tenant"] ?? null;
    });

    await page.goto(options.baseUrl + "/", { waitUntil: "load" });
    // The page fills its speed fields from /demo/config once it has loaded.
    await page.waitForFunction(() => document.getElementById("tokens").value !== "");
    marks.loaded = Date.now();
    result.initial = await snapshot(page);
    if (options.speed) {
      await page.fill("#tokens", String(options.speed.tokens));
      await page.fill("#delay", String(options.speed.delay));
    }
    await page.fill("#message", options.message);
    marks.sent = Date.now();
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

    await scenario(page, result);

    result.final = await waitFor(
      "the turn to finish on the page",
      async () => {
        const shown = await snapshot(page);
        return shown.live.length === 0 && !shown.busy && shown.assistants.length > 0 ? shown : null;
      },
      FINISH_TIMEOUT_MS,
    );
    result.finishedAt = Date.now();
    marks.finished = result.finishedAt;
    sampling = false;
    await sampler;
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
