import { proxyActivities } from '@temporalio/workflow';
import { databaseStep } from '../workflows/options';

/**
 * The rotation benchmark's baseline: a workflow that runs `activities` activities one after the
 * other, each doing nothing, with the same option preset as the rotation's database steps.
 * What a rotation costs beyond this is its own work (SQL, crypto, HTTP to the dependent, mail).
 */
const { noop } = proxyActivities<{ noop(step: number): Promise<void> }>(databaseStep);

export async function noopRotation(input: { activities: number }): Promise<number> {
  for (let step = 0; step < input.activities; step++) await noop(step);
  return input.activities;
}
