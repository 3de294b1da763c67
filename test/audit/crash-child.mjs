// Child process of crash.test.ts. It records decision batches in a loop and prints each batch's
// frame ids only after recordBatch has returned, the order in which the pipeline audits a batch
// and then sends it to the actuator. The parent kills it with SIGKILL at a random moment.
//
// Arguments: URL of the compiled store module, database file, run id, records per batch.
import { setImmediate as yieldToEventLoop } from "node:timers/promises";

const [storeModuleUrl, file, runId, batchSizeText] = process.argv.slice(2);
const batchSize = Number(batchSizeText);
const { AuditStore } = await import(storeModuleUrl);

const store = AuditStore.open(file);
process.stdout.write("ready\n");

for (let batch = 0; ; batch += 1) {
  const now = Date.now();
  const records = Array.from({ length: batchSize }, (_, index) => ({
    frameId: `${runId}-${batch}-${index}`,
    source: "cam-crash",
    capturedAt: now - 30,
    decidedAt: now,
    modelName: "crash-model",
    modelVersion: "0.0.1",
    modelSha256: "0".repeat(64),
    top: [{ label: "pet-bottle", p: 0.9 }],
    label: "pet-bottle",
    confidence: 0.9,
    bin: "plastic",
    reason: null,
    latency: { queueMs: 1, decodeMs: 2, inferenceMs: 3, totalMs: 30 },
    error: null,
    truth: null,
  }));
  store.recordBatch(records);
  process.stdout.write(`sent ${records.map((record) => record.frameId).join(" ")}\n`);
  await yieldToEventLoop();
}
