import type { Express } from 'express';
import { createApp } from '../../api/app';
import { createLogger } from '../../core/logger';
import type { Harness } from './harness';

export interface RouteInfo {
  method: string;
  path: string;
}

interface Layer {
  route?: { path: string; methods: Record<string, boolean> };
  handle?: { stack?: Layer[] };
}

/** Every route the API serves, read from Express's router stack (so a new route is never missed). */
export function listRoutes(app: Express): RouteInfo[] {
  const out: RouteInfo[] = [];
  const walk = (stack: Layer[]) => {
    for (const layer of stack) {
      if (layer.route) {
        for (const [method, on] of Object.entries(layer.route.methods)) if (on && method !== '_all') out.push({ method: method.toUpperCase(), path: layer.route.path });
      } else if (layer.handle?.stack) {
        walk(layer.handle.stack);
      }
    }
  };
  walk((app as unknown as { router: { stack: Layer[] } }).router.stack);
  return out;
}

/** The routes of an app built like the harness's (not listening). */
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
