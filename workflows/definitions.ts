import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import type { RotationProgress } from './types';

/** Messages the API sends to a running rotation, and what it can ask of it. */
export const progressQuery = defineQuery<RotationProgress>('progress');

/**
 * A leak was reported: skip the grace period and revoke the previous version at once. If the
 * leaked version is the one this rotation made current, the credential is rotated once more.
 */
export const leakSignal = defineSignal<[{ incidentId: string; version?: number }]>('leak');

/** During the grace period: make the previous version current again everywhere. */
export const rollbackUpdate = defineUpdate<{ current: number; abandoned: number }>('rollback');
