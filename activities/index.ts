import type { Client } from '@temporalio/client';
import type { Pool } from '../db/pool';
import type { Dependent } from '../dependents/types';
import type { Mailer } from '../mail/mailer';
import type { Provider } from '../providers/types';
import type { Identities } from '../vault/identities';
import type { RotationVault } from '../vault/rotation-vault';
import type { Vault } from '../vault/vault';
import { batchActivities } from './batch';
import { leakActivities } from './leak-runs';
import { noticeActivities } from './notices';
import { policyActivities } from './policies';
import { rotationActivities } from './rotation';

/** What the activities need, narrowly: the worker builds these once and hands them in. */
export interface ActivityDeps {
  pool: Pool;
  vault: Pick<Vault, 'describe' | 'get' | 'storedValues' | 'destroy'>;
  rotations: Pick<RotationVault, 'findStaged' | 'createMayHaveRun' | 'giveUpCreate' | 'createGivenUp' | 'stagePending' | 'read' | 'promote' | 'rollback' | 'discardPending' | 'markRevoked' | 'planPolicy' | 'plannedPolicy'>;
  identities: Pick<Identities, 'get'>;
  mailer: Mailer;
  providers: Record<string, Provider<any>>;
  dependents: Record<string, Dependent<any>>;
  /** For batches and sweeps, which start rotations themselves. */
  temporal?: { client: Client; taskQueue: string };
  securityNotify?: string[];
  /** Rotations one batch keeps open at once (BATCH_MAX_OPEN_ROTATIONS); the rest wait their turn. */
  maxOpenRotations?: number;
  clock?: () => Date;
  /** How long a delivery waits for its message's commit (MESSAGE_COMMIT_WAIT_MS unless set: tests). */
  messageCommitWaitMs?: number;
}

/**
 * Every activity. They take ids and versions and open the vault themselves; a value never leaves
 * an activity except towards the provider or dependent that needs it.
 */
export function createActivities(deps: ActivityDeps) {
  return {
    ...rotationActivities(deps),
    ...leakActivities(deps),
    ...noticeActivities(deps),
    ...batchActivities(deps),
    ...policyActivities(deps),
  };
}
