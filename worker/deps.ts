import type { Client } from '@temporalio/client';
import type { ActivityDeps } from '../activities';
import type { Services } from '../core/services';
import { createDependents } from '../dependents';
import { providers } from '../providers';

/** The worker's composition: the shared services plus the provider and dependent registries. */
export function activityDeps(
  services: Services,
  opts: { envFilesRoot: string; client?: Client; taskQueue: string; securityNotify?: string[]; clock?: () => Date; maxOpenRotations?: number; messageCommitWaitMs?: number },
): ActivityDeps {
  return {
    ...services,
    providers,
    dependents: createDependents({ envFilesRoot: opts.envFilesRoot }),
    temporal: opts.client ? { client: opts.client, taskQueue: opts.taskQueue } : undefined,
    securityNotify: opts.securityNotify,
    clock: opts.clock,
    maxOpenRotations: opts.maxOpenRotations,
    messageCommitWaitMs: opts.messageCommitWaitMs,
  };
}
