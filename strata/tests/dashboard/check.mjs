// Drives the dashboard in headless Chromium for strata/tests/e2e_dashboard.rs and prints, as one
// JSON object on stdout, what the page shows; the Rust test compares it with the API's answers.
//
//   node check.mjs URL SCREENSHOT.png PROFILE_DIR
//
// playwright-core is found in $STRATA_NODE_MODULES (default ~/.cache/strata/tools/node/node_modules,
// where scripts/deps.sh installs it); the browser is Debian's /usr/bin/chromium.
import { createRequire } from "node:module";
import { homedir } from "node:os";
import { join } from "node:path";

const [url, screenshot, profile] = process.argv.slice(2);
if (!url || !screenshot || !profile) {
  console.error("usage: node check.mjs URL SCREENSHOT.png PROFILE_DIR");
  process.exit(2);
}
const modules = process.env.STRATA_NODE_MODULES || join(homedir(), ".cache/strata/tools/node/node_modules");
const require = createRequire(import.meta.url);
const { chromium } = require(join(modules, "playwright-core"));

const TIMEOUT = 30_000;
const problems = [];
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.STRATA_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1440, height: 900 },
  timezoneId: "UTC",
  colorScheme: "light",
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const where = m.location()?.url ?? "";
    // The browser logs every 4xx fetch; the one the unknown item below asks for is expected.
    if (where.includes("/no-such-item")) return;
    problems.push("console error: " + m.text() + (where ? " (" + where + ")" : ""));
  });
  page.on("requestfailed", (r) => problems.push("request failed: " + r.url() + " " + (r.failure()?.errorText ?? "")));

  const response = await page.goto(url, { waitUntil: "load" });
  const contentType = response ? response.headers()["content-type"] : null;

  // Every panel has rendered an answer.
  await page.waitForSelector("#top-items li[data-item]");
  await page.waitForSelector("#trending li[data-item]");
  await page.waitForSelector("#fleet-status[data-status]:not([data-status=''])");
  await page.waitForSelector("#events-per-second[data-count]");
  await page.waitForSelector("#events-chart rect.bar");
  await page.waitForSelector("#freshness[data-ready='true']");

  // Recommendations for the item p-a, typed into the form.
  await page.click("label[for=rec-kind-item]");
  await page.fill("#rec-id", "p-a");
  await page.click("#rec-submit");
  await page.waitForSelector("#rec-results[data-query='item:p-a'][data-state='ok'] li[data-item]");

  // A couple of polls later, read everything from one moment.
  const polls = await page.evaluate(() => Number(document.body.dataset.polls || 0));
  await page.waitForFunction((n) => Number(document.body.dataset.polls || 0) >= n + 1, polls);
  const shown = await page.evaluate(() => {
    const text = (e) => (e ? e.textContent.replace(/\s+/g, " ").trim() : null);
    const digits = (s) => Number(String(s).replace(/[^0-9]/g, ""));
    const rows = (sel) => [...document.querySelectorAll(sel)];
    const eps = document.getElementById("events-per-second");
    const fresh = document.getElementById("freshness");
    const fleet = document.getElementById("fleet-status");
    return {
      title: document.title,
      top_items: rows("#top-items li[data-item]").map((li) => ({
        item: text(li.querySelector(".name")),
        count: digits(text(li.querySelector(".count"))),
        data_count: Number(li.dataset.count),
      })),
      trending: rows("#trending li[data-item]").map((li) => text(li.querySelector(".name"))),
      fleet: {
        status: fleet.dataset.status,
        text: text(fleet),
        late: rows("#fleet-late li[data-device]").map((li) => li.dataset.device),
        silent: rows("#fleet-silent li[data-device]").map((li) => li.dataset.device),
      },
      events: {
        per_second: text(eps),
        minute: eps.dataset.minute,
        count: Number(eps.dataset.count),
        series: rows("#events-chart rect.bar").map((r) => ({ start: r.dataset.start, value: Number(r.dataset.value) })),
      },
      freshness: {
        text: text(fresh),
        batch_version: fresh.dataset.batchVersion,
        published_at: fresh.dataset.publishedAt,
        speed_age_ms: fresh.dataset.speedAgeMs,
      },
      connection: text(document.getElementById("conn")),
      recommendations: {
        summary: text(document.getElementById("rec-summary")),
        items: rows("#rec-results li[data-item]").map((li) => text(li.querySelector(".name"))),
      },
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });

  // An unknown item: the page shows the API's error message.
  await page.fill("#rec-id", "no-such-item");
  await page.click("#rec-submit");
  await page.waitForSelector("#rec-error[data-query='item:no-such-item']:not([hidden])");
  shown.rec_error = {
    status: await page.getAttribute("#rec-error", "data-status"),
    text: (await page.textContent("#rec-error")).trim(),
    items: await page.locator("#rec-results li[data-item]").count(),
  };

  // The user form.
  await page.click("label[for=rec-kind-user]");
  await page.fill("#rec-id", "u1");
  await page.click("#rec-submit");
  await page.waitForSelector("#rec-results[data-query='user:u1'][data-state='ok']");
  shown.user_recommendations = await page.$$eval("#rec-results li[data-item] .name", (els) => els.map((e) => e.textContent.trim()));

  shown.content_type = contentType;
  shown.problems = problems;
  shown.screenshot = screenshot;
  process.stdout.write(JSON.stringify(shown) + "\n");
} finally {
  await context.close();
}
