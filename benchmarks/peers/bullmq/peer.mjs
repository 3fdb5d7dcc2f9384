// BullMQ with its defaults: one Worker (concurrency 1), jobs delayed with
// queue.add(name, data, { delay }); the worker promotes delayed jobs itself.
//
//   node peer.mjs worker              run a worker until SIGTERM
//   node peer.mjs load --count N      add N pending jobs, a day ahead and later
//   node peer.mjs schedule --count N --rate R --lead S
//                                     add N jobs due S seconds after now, R a second, and
//                                     print {"t0", "enqueue_s"} (seconds) as one line
//
// Settings come from the environment: PEER_REDIS_URL, PEER_DB, PEER_READY_DIR.
// The due-time pattern and the job's work are those of ../jobs/peer_common.py.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

import Database from "better-sqlite3";
import { Queue, Worker } from "bullmq";
import { Redis } from "ioredis";

const PENDING_AHEAD_S = 86400.0;
const PENDING_STEP_S = 0.1;
const CHUNK = 1000; // jobs per addBulk call
const QUEUE = "peers";

// Epoch seconds with sub-millisecond precision (Date.now() has whole milliseconds).
const nowS = () => (performance.timeOrigin + performance.now()) / 1000;

// BullMQ 6 takes a client instance in an ES module (ioredis is an optional peer of it).
function connection() {
  const url = new URL(process.env.PEER_REDIS_URL);
  // maxRetriesPerRequest: null is what BullMQ requires of a worker's connection.
  return new Redis({ host: url.hostname, port: Number(url.port), maxRetriesPerRequest: null });
}

async function worker() {
  const db = new Database(process.env.PEER_DB, { timeout: 30000 });
  db.pragma("busy_timeout = 30000");
  const insert = db.prepare("INSERT INTO fired (job, due, fired, pid) VALUES (?, ?, ?, ?)");
  const client = connection();
  const w = new Worker(
    QUEUE,
    async (job) => {
      const fired = nowS();
      insert.run(job.data.job, job.data.due, fired, process.pid);
    },
    { connection: client },
  );
  w.on("error", (err) => console.error(err));
  await w.waitUntilReady();
  writeFileSync(join(process.env.PEER_READY_DIR, `ready-${process.pid}`), "ready\n");
  const stop = async () => {
    // close() waits for Redis: if Redis is gone, leave anyway after 5 s.
    setTimeout(() => process.exit(1), 5000).unref();
    await w.close();
    await client.quit();
    db.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function add(plan) {
  const client = connection();
  const queue = new Queue(QUEUE, { connection: client });
  for (let i = 0; i < plan.length; i += CHUNK) {
    // BullMQ stamps each job with its own Date.now() and adds the delay: rounding the
    // delay up keeps the job's due time at or after ours.
    const now = Date.now();
    await queue.addBulk(
      plan.slice(i, i + CHUNK).map(([job, due]) => ({
        name: "fire",
        data: { job, due },
        opts: { delay: Math.max(0, Math.ceil(due * 1000 - now)), jobId: job },
      })),
    );
  }
  await queue.close();
  // A client passed in stays open after close(): quit it, or node never exits.
  await client.quit();
}

async function main() {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: { count: { type: "string" }, rate: { type: "string" }, lead: { type: "string" } },
  });
  const command = positionals[0];
  const count = Number(values.count);
  if (command === "worker") {
    await worker();
  } else if (command === "load") {
    const now = nowS();
    const plan = Array.from({ length: count }, (_, j) => [
      `p${j}`,
      now + PENDING_AHEAD_S + PENDING_STEP_S * j,
    ]);
    await add(plan);
  } else if (command === "schedule") {
    const rate = Number(values.rate);
    const lead = Number(values.lead);
    const t0 = nowS();
    const plan = Array.from({ length: count }, (_, i) => [`m${i}`, t0 + lead + i / rate]);
    await add(plan);
    console.log(JSON.stringify({ t0, enqueue_s: nowS() - t0 }));
  } else {
    console.error("usage: node peer.mjs worker | load --count N | schedule --count N --rate R --lead S");
    process.exit(2);
  }
}

await main();
