import { fileURLToPath } from 'node:url';
import { NativeConnection, Worker } from '@temporalio/worker';

/**
 * The baseline worker of the rotation benchmark, run as a child process like the real worker
 * (same SDK, same default concurrency): TEMPORAL_ADDRESS, TASK_QUEUE. Stops on SIGTERM.
 */
const connection = await NativeConnection.connect({ address: process.env.TEMPORAL_ADDRESS! });
const worker = await Worker.create({
  connection,
  namespace: 'default',
  taskQueue: process.env.TASK_QUEUE!,
  workflowsPath: fileURLToPath(new URL('./noop-workflow.ts', import.meta.url)),
  activities: { noop: async () => undefined },
});
for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => worker.shutdown());
await worker.run();
await connection.close();
