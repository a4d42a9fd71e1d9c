/** What crosses the workflow boundary: ids and versions, never a secret value. */
export interface RotationIds {
  rotationId: string;
  identityId: string;
  credentialId: string;
  workflowId: string;
}

export type RotationMode = 'requested' | 'scheduled' | 'leak';

export type StepName = 'create_pending' | 'apply_dependents' | 'verify' | 'promote' | 'grace' | 'revoke_previous' | 'compensate' | 'notify';
export type StepState = 'waiting' | 'running' | 'done' | 'failed' | 'skipped';

export interface StepProgress {
  name: StepName;
  state: StepState;
  attempt?: number;
  error?: string;
}

export type RotationOutcome = 'rotated' | 'failed' | 'cancelled' | 'rolled_back';

export interface RotationProgress {
  /** `not_due`: a sweep's run that found its credential changed since the sweep began, and did nothing (NotDue). */
  state: 'running' | 'grace' | 'succeeded' | 'not_due' | RotationOutcome;
  mode: RotationMode;
  attempt: number;
  steps: StepProgress[];
  fromVersion?: number;
  toVersion?: number;
  graceEndsAt?: string;
  leakReported?: boolean;
  /**
   * Why a rollback (or a cancel in grace) was refused: a value stored since is current. The run
   * waits out its grace period and ends rotated; nothing a cancel could undo is left.
   */
  rollbackRefused?: string;
  error?: string;
}

/**
 * What a sweep's run is answered at its plan when its credential changed since the sweep began
 * (activities/rotation.ts, planRotation): the run ends `not_due`, having done nothing.
 */
export interface NotDue {
  notDue: string;
}

export interface RotationPlan {
  provider: string;
  /** The version that was current when the rotation began (what compensation keeps working). */
  currentVersion: number;
  credentialName: string;
  dependents: { index: number; type: string }[];
  graceSeconds: number;
  maxAttempts: number;
}

export type NoticeKind = 'rotated' | 'failed' | 'cancelled' | 'rolled_back' | 'revoke_failed' | 'superseded';

export interface RotationNotice extends RotationIds {
  outcome: NoticeKind;
  mode: RotationMode;
  fromVersion?: number;
  toVersion?: number;
  graceEndsAt?: string;
  error?: string;
  step?: string;
  /** What went wrong without stopping the run (an undo that failed, a dependent not told), each as `what: why`. */
  problems?: string[];
  /** Revoking the previous version failed (its own notice said so): a later notice must not say it was revoked. */
  previousNotRevoked?: boolean;
  /** A rollback could not revoke the version it abandoned at the provider: the notice must not say it was revoked. */
  abandonedNotRevoked?: boolean;
  /**
   * A rollback (or a failed or cancelled attempt's undo: PENDING_KEPT_UNDER_DEPENDENTS) left the
   * version it abandoned working at the provider: dependents it could not put back may still use it
   * (its problems say which), to be revoked once they are off it.
   */
  abandonedKept?: boolean;
  /** A rollback could not put every dependent back on the previous version (its problems say which). */
  restoresFailed?: boolean;
  /** A cancelled run that heard of a leak: the credential is rotated again at once, in leak mode. */
  rotatingAgain?: boolean;
  /** The version current once the run revoked its previous one, when newer than `toVersion` (a value stored meanwhile). */
  currentVersion?: number;
  /** A `superseded` notice: the replaced version had been reported leaked, and was revoked unless `supersededRevoked` is false. */
  supersededLeaked?: boolean;
  supersededRevoked?: boolean;
  /**
   * The credential was not rotated now (deleted, or its policy taken away, while the run went on)
   * when the run would have rotated it again for a leak, and the run answered the leaks itself (see
   * UNROTATED_LEAKS_TOLD): the leaked versions it revoked at the provider (replaced since), those
   * still live (told as not rotated, in an email of their own), and the revokes that failed (`what:
   * why`; their versions are among `live`). Versions only.
   */
  unrotatedLeaks?: { revoked: number[]; live: number[]; failed: string[] };
}
