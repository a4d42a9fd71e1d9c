/** What crosses the workflow boundary: ids and versions, never a secret value. */
export interface RotationIds {
  rotationId: string;
  identityId: string;
  credentialId: string;
  workflowId: string;
}

export type StepName = 'create_pending' | 'promote' | 'compensate' | 'notify';
export type StepState = 'waiting' | 'running' | 'done' | 'failed' | 'skipped';

export interface RotationProgress {
  state: 'running' | 'succeeded' | 'failed';
  steps: { name: StepName; state: StepState; error?: string }[];
  fromVersion?: number;
  toVersion?: number;
  error?: string;
}

export interface RotationNotice extends RotationIds {
  outcome: 'rotated' | 'failed';
  fromVersion?: number;
  toVersion?: number;
  error?: string;
}
