// Probe: is the server's guarded upsert atomic? Two guarded updates of one
// document (outbox_id n and n+1) in flight at once must leave n+1, whichever
// lands first; a server that filters and writes in two steps leaves n.
//   node benches/peers/gw/guard_race.js mongodb://127.0.0.1:27017/SOME_DB
// Uses (and drops) the collection `guard_race`. Exit 1 on a lost update.
"use strict";

const { MongoClient, Long } = require("mongodb");

/** The guarded upsert of src/mongo.rs, reduced to outbox_id; 11000 means newer. */
function guarded(c, id) {
  const filter = { _id: "a", outbox_id: { $not: { $gte: Long.fromNumber(id) } } };
  return c.updateOne(filter, { $set: { outbox_id: Long.fromNumber(id) } }, { upsert: true }).catch((e) => {
    if (e.code !== 11000) throw e;
  });
}

async function main() {
  const url = process.argv[2];
  if (!url) throw new Error("usage: guard_race.js MONGODB_URL_WITH_DATABASE");
  const m = new MongoClient(url);
  await m.connect();
  const c = m.db().collection("guard_race");
  let lost = 0;
  try {
    await c.deleteMany({});
    // Other documents make the server's read step longer, as in real use.
    const filler = Array.from({ length: 100 }, (_, k) => ({ _id: `x${k}`, outbox_id: Long.fromNumber(0) }));
    await c.insertMany([{ _id: "a", outbox_id: Long.fromNumber(0) }, ...filler]);
    const pairs = 50;
    for (let n = 1; n < 2 * pairs; n += 2) {
      const order = Math.random() < 0.5 ? [n, n + 1] : [n + 1, n];
      await Promise.all(order.map((id) => guarded(c, id)));
      const held = Number((await c.findOne({ _id: "a" })).outbox_id);
      if (held !== n + 1) {
        lost += 1;
        await c.updateOne({ _id: "a" }, { $set: { outbox_id: Long.fromNumber(n + 1) } });
      }
    }
    console.log(JSON.stringify({ probe: "guard_race", pairs, lost_updates: lost }));
  } finally {
    await c.drop().catch(() => {});
    await m.close();
  }
  process.exit(lost ? 1 : 0);
}

main().catch((e) => {
  console.error(`guard_race: ${e.stack || e}`);
  process.exit(2);
});
