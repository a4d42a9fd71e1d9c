import { Router } from 'express';
import type { Client } from '@temporalio/client';
import { AppError } from '../../core/errors';
import type { Logger } from '../../core/logger';
import type { Pool } from '../../db/pool';
import type { ReadThread } from '../../vault/read-thread';
import { documented } from '../openapi';
import { sendProblem } from '../problem';
import { health, readiness } from '../responses';

type Check = 'ok' | 'unavailable';
type Name = 'database' | 'temporal' | 'vault';
const NAMES: Record<Name, string> = { database: 'the database', temporal: 'Temporal', vault: 'the vault thread' };

/**
 * Liveness says the process answers; readiness says its database and Temporal answer too, and, with
 * READ_THREAD on, the vault thread that runs vault.get, vault.totp and vault.store (a ping queued
 * behind its calls, through its own pool): a thread that cannot start, is restarting or is stuck
 * fails every primitive while the main thread's pool still answers. Nobody needs a token for any of
 * them, so a failed check says only which is down: why (a host and port refused, a user name the
 * database would not take) goes to the log.
 */
export function healthRoutes(deps: { pool: Pool; client: Client; namespace: string; logger: Logger; readThread?: ReadThread }): Router {
  const router = Router();
  router.get('/healthz', documented({ summary: 'Liveness: the process answers', auth: 'none', responses: { 200: health } }), (_req, res) => {
    res.json({ status: 'ok' });
  });
  router.get(
    '/readyz',
    documented({
      summary: 'Readiness: the database and Temporal answer (and the vault thread, with READ_THREAD on)',
      description:
        'When a dependency is not ready: 503, a problem whose `checks` member says which ("ok" or "unavailable"). `vault` is there when the API runs its vault calls in a thread of their own (READ_THREAD on).',
      auth: 'none',
      responses: { 200: readiness },
      problems: [503],
    }),
    async (_req, res) => {
      const check = async (name: Name, probe: () => Promise<unknown>): Promise<Check> => {
        try {
          await Promise.race([probe(), new Promise((_, reject) => setTimeout(() => reject(new Error('timed out after 2 s')), 2_000).unref())]);
          return 'ok';
        } catch (err) {
          deps.logger.warn({ check: name, reason: (err as Error).message?.split('\n')[0] }, 'readiness check failed');
          return 'unavailable';
        }
      };
      const thread = deps.readThread;
      const [database, temporal, vault] = await Promise.all([
        check('database', () => deps.pool.query('SELECT 1')),
        check('temporal', () =>
          deps.client.connection.withDeadline(Date.now() + 2_000, () => deps.client.workflowService.describeNamespace({ namespace: deps.namespace })),
        ),
        thread && check('vault', () => thread.ping()),
      ]);
      const checks: Partial<Record<Name, Check>> = { database, temporal, ...(vault && { vault }) };
      const down = (Object.keys(checks) as Name[]).filter((name) => checks[name] !== 'ok');
      if (down.length === 0) {
        res.json({ status: 'ready', checks });
        return;
      }
      const names = down.map((name) => NAMES[name]);
      const detail = `not ready: ${names.join(' and ')} ${down.length > 1 ? 'are' : 'is'} unavailable`;
      sendProblem(res, new AppError(503, 'unavailable', 'Service unavailable', detail, { checks }));
    },
  );
  return router;
}
