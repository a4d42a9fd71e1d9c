import { ScheduleAlreadyRunning, type Client } from '@temporalio/client';
import { ConfigError } from '../core/config';
import type { Logger } from '../core/logger';

/**
 * The service's Temporal Schedules: the rotation sweep (hourly by default) and the weekly orphaned
 * service-account report. Made sure of at every worker start; an existing schedule gets the
 * configured spec, so changing SWEEP_CRON takes effect on the next start.
 */
export const SWEEP_SCHEDULE_ID = 'rotation-sweep';
export const ORPHAN_SCHEDULE_ID = 'orphan-report';

/** One set of schedules per deployment (task queue); the default deployment's are plainly named. */
export function scheduleId(base: string, taskQueue: string): string {
  return taskQueue === 'mailgent' ? base : `${base}-${taskQueue}`;
}

export async function ensureSchedules(
  client: Client,
  opts: { taskQueue: string; sweepCron: string; orphanCron: string; orphanDays: number; retentionDays: number; mailRetentionDays?: number; logger?: Logger },
): Promise<void> {
  const schedules = [
    { scheduleId: scheduleId(SWEEP_SCHEDULE_ID, opts.taskQueue), setting: 'SWEEP_CRON', cron: opts.sweepCron, workflowType: 'rotationSweep', args: [{ retentionDays: opts.retentionDays, mailRetentionDays: opts.mailRetentionDays ?? 30 }] },
    { scheduleId: scheduleId(ORPHAN_SCHEDULE_ID, opts.taskQueue), setting: 'ORPHAN_REPORT_CRON', cron: opts.orphanCron, workflowType: 'orphanReport', args: [{ days: opts.orphanDays }] },
  ];
  for (const s of schedules) {
    const options = {
      scheduleId: s.scheduleId,
      spec: { cronExpressions: [s.cron] },
      action: { type: 'startWorkflow' as const, workflowType: s.workflowType, args: s.args, taskQueue: opts.taskQueue, workflowId: s.scheduleId },
      // A sweep still running when the next one is due is not doubled up.
      policies: { overlap: 'SKIP' as const, catchupWindow: '1 day' },
    };
    try {
      try {
        await client.schedule.create(options);
        opts.logger?.info({ scheduleId: s.scheduleId, cron: s.cron }, 'created schedule');
      } catch (err) {
        if (!(err instanceof ScheduleAlreadyRunning)) throw err;
        await client.schedule.getHandle(s.scheduleId).update((previous) => ({
          ...previous,
          spec: options.spec,
          action: options.action,
          policies: { ...previous.policies, ...options.policies },
        }));
      }
    } catch (err) {
      // Whatever the configuration check let through, the server's parser has the last word: name the setting.
      if (/invalid schedule spec|is not in range|cron/i.test((err as Error).message)) throw new ConfigError([`${s.setting}: the Temporal server refused it: ${(err as Error).message}`]);
      throw err;
    }
  }
}
