import { describe, expect, it } from 'vitest';
import { windowOpen } from '../../activities/batch';
import { loadConfig } from '../../core/config';
import { credentialUpdate } from '../../api/schemas';
import type { RotationWindow } from '../../vault/types';

const HOUR = 3_600_000;

/** The instants of one week at which a cron of the form `M * * * *` (hourly, UTC) starts the sweep. */
function hourlySweeps(cron: string, from = Date.UTC(2026, 10, 30)): Date[] {
  const m = /^(\d{1,2}) \* \* \* \*$/.exec(cron);
  if (!m) throw new Error(`not an hourly cron: ${cron}`);
  return Array.from({ length: 7 * 24 }, (_, i) => new Date(from + i * HOUR + Number(m[1]) * 60_000));
}

describe('rotation windows', () => {
  it('are [startHour, endHour) on the window’s days in its time zone, wrapping past midnight', () => {
    const berlinOffice: RotationWindow = { days: [1, 2, 3, 4, 5], startHour: 9, endHour: 17, timezone: 'Europe/Berlin' };
    // Monday 30 November 2026: 08:00 UTC is 09:00 in Berlin (CET, UTC+1).
    expect(windowOpen(berlinOffice, new Date('2026-11-30T08:00:00Z'))).toBe(true);
    expect(windowOpen(berlinOffice, new Date('2026-11-30T07:59:00Z'))).toBe(false);
    expect(windowOpen(berlinOffice, new Date('2026-11-30T16:00:00Z'))).toBe(false);
    expect(windowOpen(berlinOffice, new Date('2026-11-29T10:00:00Z'))).toBe(false); // a Sunday
    const overnight: RotationWindow = { days: [0, 1, 2, 3, 4, 5, 6], startHour: 22, endHour: 2, timezone: 'UTC' };
    expect(windowOpen(overnight, new Date('2026-11-30T23:00:00Z'))).toBe(true);
    expect(windowOpen(overnight, new Date('2026-11-30T01:00:00Z'))).toBe(true);
    expect(windowOpen(overnight, new Date('2026-11-30T02:00:00Z'))).toBe(false);
    // The hours past midnight belong to the day the window started on: Friday 22–2 is Friday night.
    const fridayNight: RotationWindow = { days: [5], startHour: 22, endHour: 2, timezone: 'UTC' };
    expect(windowOpen(fridayNight, new Date('2026-11-27T23:00:00Z'))).toBe(true); // Friday 23:00
    expect(windowOpen(fridayNight, new Date('2026-11-28T01:00:00Z'))).toBe(true); // Saturday 01:00 (before: closed)
    expect(windowOpen(fridayNight, new Date('2026-11-27T01:00:00Z'))).toBe(false); // Friday 01:00, Thursday night (before: open)
    expect(windowOpen(fridayNight, new Date('2026-11-28T23:00:00Z'))).toBe(false); // Saturday 23:00
  });

  it('are each reached by the default sweep schedule, whatever the hour and the zone’s offset', () => {
    // A daily sweep at 03:00 UTC never fell inside Berlin office hours, so such credentials were never rotated.
    const sweeps = hourlySweeps(loadConfig({}).SWEEP_CRON);
    for (const timezone of ['UTC', 'Europe/Berlin', 'America/Los_Angeles', 'Asia/Kolkata', 'Asia/Kathmandu', 'America/St_Johns', 'Pacific/Chatham']) {
      for (let startHour = 0; startHour < 24; startHour++) {
        for (let day = 0; day < 7; day++) {
          const window: RotationWindow = { days: [day], startHour, endHour: startHour + 1, timezone };
          expect(sweeps.some((at) => windowOpen(window, at)), JSON.stringify(window)).toBe(true);
        }
      }
    }
  });

  it('that could never open are refused', () => {
    const policy = (startHour: number, endHour: number) =>
      credentialUpdate.safeParse({ rotation: { provider: 'generated', window: { days: [1], startHour, endHour, timezone: 'UTC' } } });
    expect(policy(5, 5).success).toBe(false);
    expect(policy(0, 0).error?.issues.map((i) => [i.path.join('.'), i.message])).toEqual([
      ['rotation.window.endHour', 'must be open for at least an hour: startHour and endHour differ (0 and 24 for all day)'],
    ]);
    expect(policy(0, 24).success).toBe(true);
    expect(policy(23, 0).success).toBe(true);
  });
});
