// The graphile-worker peer: one job per message, task `apply_debt` does the
// guarded upsert outboxd makes (src/mongo.rs), with the official Node driver.
//
//   node worker.js migrate --database-url URL
//   node worker.js run --database-url URL --mongodb-url URL [--collection C]
//                      [--concurrency N] [--apply-log FILE] [--ready-file FILE]
"use strict";

const fs = require("fs");
const { run, runMigrations, Logger } = require("graphile-worker");
const { MongoClient, Long } = require("mongodb");

const AMOUNT = /^([0-9]{1,15})(?:\.([0-9]{1,2}))?$/;

/** Exact minor units of a decimal text ("1234.56" -> 123456), never via float. */
function amountMinor(text) {
  const m = AMOUNT.exec(text);
  if (!m) throw new Error(`payload field \`amount\` is not a decimal such as "1234.56": ${text}`);
  return Long.fromBigInt(BigInt(m[1]) * 100n + BigInt((m[2] || "").padEnd(2, "0")));
}

/** The `$set` document for one workload message, field for field as outboxd writes it. */
function documentOf(msg) {
  const p = msg.payload;
  return {
    client_reference: p.client_reference,
    creditor_name: p.creditor_name,
    creditor_reference: p.creditor_reference ?? null,
    amount: p.amount,
    amount_minor: amountMinor(p.amount),
    currency: p.currency,
    email_id: Long.fromNumber(msg.email_id),
    ticket_id: Long.fromNumber(msg.ticket_id),
    webhook_id: msg.webhook_id,
    idempotency_key: msg.idempotency_key,
    outbox_id: Long.fromNumber(msg.outbox_id),
    synced_at: new Date(),
  };
}

/** Upserts unless the document holds this message or a newer one; 11000 twice counts as applied. */
async function writeGuarded(collection, msg) {
  const filter = { _id: msg.aggregate_id, outbox_id: { $not: { $gte: Long.fromNumber(msg.outbox_id) } } };
  const update = { $set: documentOf(msg) };
  for (let round = 0; round < 2; round++) {
    try {
      await collection.updateOne(filter, update, { upsert: true });
      return;
    } catch (e) {
      if (e.code !== 11000) throw e;
    }
  }
}

/** `--name value` pairs into an object. */
function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith("--") || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  return out;
}

/** Warnings and errors only: the default logger writes a line per job. */
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`gw ${level}: ${message}`);
});

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  const a = parseArgs(rest);
  if (!a["database-url"]) throw new Error("--database-url is required");
  if (command === "migrate") {
    await runMigrations({ connectionString: a["database-url"], logger });
    return;
  }
  if (command !== "run") throw new Error(`unknown command ${command}; expected migrate or run`);
  if (!a["mongodb-url"]) throw new Error("--mongodb-url is required");

  const mongo = new MongoClient(a["mongodb-url"]);
  await mongo.connect();
  const collection = mongo.db().collection(a.collection || "creditor_debts");
  const log = a["apply-log"] ? fs.openSync(a["apply-log"], "a") : null;
  let pending = [];
  const flush = () => {
    if (log !== null && pending.length) fs.writeSync(log, pending.join(""));
    pending = [];
  };
  const flusher = setInterval(flush, 100);

  const runner = await run({
    connectionString: a["database-url"],
    concurrency: Number(a.concurrency || 1),
    noHandleSignals: true,
    logger,
    taskList: {
      apply_debt: async (msg) => {
        await writeGuarded(collection, msg);
        if (log !== null) pending.push(`${msg.outbox_id} ${Date.now()}\n`);
      },
    },
  });
  if (a["ready-file"]) fs.writeFileSync(a["ready-file"], "");

  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await runner.stop();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  await runner.promise;
  clearInterval(flusher);
  flush();
  await mongo.close();
}

main().catch((e) => {
  console.error(`gw: ${e.stack || e}`);
  process.exit(1);
});
