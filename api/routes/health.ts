import { Router } from 'express';
import type { Client } from '@temporalio/client';
import { AppError } from '../../core/errors';
import type { Logger } from '../../core/logger';
import type { Pool } from '../../db/pool';
import { documented } from '../openapi';
import { sendProblem } from '../problem';
import { health, readiness } from '../responses';

type Check = 'ok' | 'unavailable';

/**
 * Liveness says the process answers; readiness says its database and Temporal answer too. Nobody
 * needs a token for either, so a failed check says only which dependency is down: why (a host and
 * port refused, a user name the database would not take) goes to the log.
 */
export function healthRoutes(deps: { pool: Pool; client: Client; namespace: string; logger: Logger }): Router {
  const router = Router();
  router.get('/healthz', documented({ summary: 'Liveness: the process answers', auth: 'none', responses: { 200: health } }), (_req, res) => {
    res.json({ status: 'ok' });
  });
  router.get(
    '/readyz',
    documented({
      summary: 'Readiness: the database and Temporal answer',
      description: 'When a dependency is not ready: 503, a problem whose `checks` member says which ("ok" or "unavailable").',
      auth: 'none',
      responses: { 200: readiness },
      problems: [503],
    }),
    async (_req, res) => {
      const check = async (name: 'database' | 'temporal', probe: () => Promise<unknown>): Promise<Check> => {
        try {
          await Promise.race([probe(), new Promise((_, reject) => setTimeout(() => reject(new Error('timed out after 2 s')), 2_000).unref())]);
          return 'ok';
        } catch (err) {
          deps.logger.warn({ check: name, reason: (err as Error).message?.split('\n')[0] }, 'readiness check failed');
          return 'unavailable';
        }
      };
      const [database, temporal] = await Promise.all([
        check('database', () => deps.pool.query('SELECT 1')),
        check('temporal', () =>
          deps.client.connection.withDeadline(Date.now() + 2_000, () => deps.client.workflowService.describeNamespace({ namespace: deps.namespace })),
        ),
      ]);
      const checks = { database, temporal };
      const down = (Object.keys(checks) as (keyof typeof checks)[]).filter((name) => checks[name] !== 'ok');
      if (down.length === 0) {
        res.json({ status: 'ready', checks });
        return;
      }
      const names = down.map((name) => (name === 'database' ? 'the database' : 'Temporal'));
      const detail = `not ready: ${names.join(' and ')} ${down.length > 1 ? 'are' : 'is'} unavailable`;
      sendProblem(res, new AppError(503, 'unavailable', 'Service unavailable', detail, { checks }));
    },
  );
  return router;
}
