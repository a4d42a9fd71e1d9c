import { createApp } from '../../api/app';
import { listRoutes, type RouteInfo } from '../../api/openapi';
import { createLogger } from '../../core/logger';
import type { Harness } from './harness';

export type { RouteInfo };

/**
 * Every route of an app built like the harness's (not listening), read from Express's router stack
 * by the same walk the OpenAPI document uses, so a new route is never missed.
 */
export function harnessRoutes(h: Harness): RouteInfo[] {
  return listRoutes(
    createApp({
      ...h.services,
      dependentTypes: h.deps.dependents,
      client: h.client,
      namespace: 'default',
      taskQueue: h.taskQueue,
      adminToken: h.adminToken,
      logger: createLogger({ level: 'silent' }),
    }),
  );
}
