import { Router } from 'express';
import type { Client } from '@temporalio/client';
import type { Pool } from '../../db/pool';
import { documented } from '../openapi';
import { health, readiness } from '../responses';

/** Liveness says the process answers; readiness says its database and Temporal answer too. */
export function healthRoutes(deps: { pool: Pool; client: Client; namespace: string }): Router {
  const router = Router();
  router.get('/healthz', documented({ summary: 'Liveness: the process answers', auth: 'none', responses: { 200: health } }), (_req, res) => {
    res.json({ status: 'ok' });
  });
  router.get(
    '/readyz',
    documented({
      summary: 'Readiness: the database and Temporal answer',
      auth: 'none',
      responses: { 200: readiness, 503: { description: 'A dependency is not ready (the checks say which)', contentType: 'application/json', schema: readiness } },
    }),
    async (_req, res) => {
    const [database, temporal] = await Promise.all([
      check(() => deps.pool.query('SELECT 1')),
      check(() => deps.client.connection.withDeadline(Date.now() + 2_000, () => deps.client.workflowService.describeNamespace({ namespace: deps.namespace }))),
    ]);
    const ready = database === 'ok' && temporal === 'ok';
    res.status(ready ? 200 : 503).json({ status: ready ? 'ready' : 'not_ready', checks: { database, temporal } });
    },
  );
  return router;
}

async function check(probe: () => Promise<unknown>): Promise<string> {
  try {
    await Promise.race([probe(), new Promise((_, reject) => setTimeout(() => reject(new Error('timed out')), 2_000).unref())]);
    return 'ok';
  } catch (err) {
    return `unavailable: ${(err as Error).message.split('\n')[0]}`;
  }
}
