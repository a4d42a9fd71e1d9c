import { findOrphans, type ServiceAccountRow } from '../vault/service-accounts';
import type { ActivityDeps } from './index';
import { FAILED_RETRY_HOURS, windowOpen } from './batch';
import { handOverNotice, REFUSED_NOTICE, refusedEarlier, UNCHECKED_NOTICE } from './notices';
import { AppError } from '../core/errors';
import { cancellationOf } from '../core/outbound-cancel';
import { isDatabaseUnavailable } from '../db/pool';
import { heartbeat, heartbeating, stableUuid, warn } from './support';

/**
 * An error that may pass by itself, which fails the step (retried) rather than passing one password
 * over: the activity cancelled, an outage (the database, or a 503 of ours: Temporal away), or a
 * PostgreSQL error of a class that a retry mends (40: serialization failure, deadlock; 53:
 * resources; 57: operator intervention; 08: connection).
 */
function mayPass(err: unknown): boolean {
  if (cancellationOf() || isDatabaseUnavailable(err) || (err instanceof AppError && err.status === 503)) return true;
  const code = (err as { code?: unknown })?.code;
  return typeof code === 'string' && /^(40|53|57|08)/.test(code);
}

/** The outbox row of an overdue password's reminder to its owners. */
interface ReminderRow {
  status: string;
  sent_at: Date | null;
  created_at: Date;
  last_error: string | null;
}

/** Why the security contacts hear of an overdue password: what became of the owners' reminder (`row`, none if it had no one to go to), since when. */
function escalationReason(row: ReminderRow | undefined, since: Date, sinceDays: number): string {
  const day = since.toISOString().slice(0, 10);
  if (row?.sent_at) return `The owners were told on ${day}, ${sinceDays} days ago, and it is still unchanged.`;
  if (!row) return `The owners could not be told: the credential has no owners or notify addresses, and its identity no email (overdue since ${day}, ${sinceDays} days ago). It is still unchanged.`;
  if (row.status === 'abandoned' && row.last_error === REFUSED_NOTICE) {
    return `The owners could not be told: their reminder was refused on ${day}, ${sinceDays} days ago, for carrying a stored value. It is still unchanged.`;
  }
  if (row.status === 'abandoned' && row.last_error === UNCHECKED_NOTICE) {
    return `The owners could not be told: their reminder of ${day}, ${sinceDays} days ago, could not be checked for stored values (a key failed its integrity check). It is still unchanged.`;
  }
  return `The owners' reminder, queued on ${day}, ${sinceDays} days ago, has not been delivered${row.status === 'abandoned' ? ' (its delivery gave up)' : ''}. It is still unchanged.`;
}

/** Overdue passwords whose notices are looked up in the outbox at once (three ids each). */
const SETTLED_PAGE = 5_000;

/** The outbox ids of an overdue password's notices, one set per version: the owners' reminder, the escalation, the escalation withheld. */
export function passwordNoticeIds(c: { id: string; current_version: number }): { reminder: string; escalation: string; withheld: string } {
  const of = `password-policy:${c.id}:${c.current_version}`;
  return { reminder: stableUuid(`${of}:reminder`), escalation: stableUuid(`${of}:escalation`), withheld: stableUuid(`${of}:escalation:withheld`) };
}

/** Expiry reminders for credentials rotated by hand (14, 3 and 1 days ahead), each sent once. */
export const REMINDER_DAYS = [14, 3, 1];
const DAY_MS = 86_400_000;

/**
 * The scheduled checks that send notices rather than rotate: expiry reminders, password-policy
 * reminders and escalations, the orphaned service-account report. Each notice's id is derived from
 * what it is about (credential, version, threshold, week), and the outbox sends an id only once.
 */
export function policyActivities(deps: ActivityDeps) {
  return {
    async sendExpiryReminders(input: { asOf: string }): Promise<{ sent: number }> {
      return heartbeating(async () => {
        const asOf = new Date(input.asOf);
        const { rows } = await deps.pool.query(
          `SELECT c.id, c.name, c.kind, c.identity_id, c.owners, c.notify, c.expires_at, i.email
             FROM credentials c JOIN identities i ON i.id = c.identity_id
            WHERE c.deleted_at IS NULL AND c.rotation IS NULL AND c.expires_at IS NOT NULL
              AND c.expires_at > $1 AND c.expires_at <= $1::timestamptz + make_interval(hours => 24 * $2)
            ORDER BY c.expires_at`,
          [asOf, Math.max(...REMINDER_DAYS)],
        );
        let sent = 0;
        for (const c of rows) {
          heartbeat();
          const daysLeft = (c.expires_at.getTime() - asOf.getTime()) / DAY_MS;
          // The most urgent reminder that applies; earlier ones that were missed are not sent late.
          const due = REMINDER_DAYS.filter((d) => daysLeft <= d);
          if (due.length === 0) continue; // none should be: the query's days are 24 hours too, not the session time zone's
          const threshold = Math.min(...due);
          // The threshold names the reminder (each is sent once); the subject says how long is really left.
          const left = Math.ceil(daysLeft);
          const delivery = await handOverNotice(deps, {
            id: stableUuid(`expiry:${c.id}:${c.expires_at.toISOString()}:${threshold}`),
            identityId: c.identity_id,
            purpose: 'expiry.reminder',
            to: [...c.owners, ...c.notify, ...(c.email ? [c.email] : [])],
            subject: `[mailgent] ${c.name} expires ${left <= 1 ? 'within a day' : `in ${left} days`}`,
            text: [
              `The ${c.kind} credential '${c.name}' expires at ${c.expires_at.toISOString()} and has no rotation policy,`,
              'so Mailgent cannot rotate it for you. Replace it with vault.store before then, or give it a rotation policy.',
              '',
              `Credential id: ${c.id}`,
            ].join('\n'),
            actor: 'schedule:rotation-sweep',
            credentialId: c.id,
            detail: { daysAhead: threshold },
          });
          if (delivery) sent += 1;
        }
        return { sent };
      });
    },

    /**
     * Password policies: managed passwords past the maximum age join the sweep's rotations (when
     * their rotation window is open); owners of unmanaged ones are told once per version, and the
     * security contacts once more when the password is still unchanged the policy's escalation
     * period after the owners were told (so the owners always get that long to act).
     */
    async enforcePasswordPolicies(input: { sweepId: string; asOf: string }): Promise<{ rotating: number; reminded: number; escalated: number; failed?: number }> {
      const asOf = new Date(input.asOf);
      const { rows } = await deps.pool.query(
        `SELECT c.id, c.name, c.identity_id, c.owners, c.notify, c.rotation IS NOT NULL AS managed, c.rotation->'window' AS window, c.current_version,
                (c.status = 'rotation_failed' AND c.updated_at > $1::timestamptz - make_interval(hours => ${FAILED_RETRY_HOURS})
                 OR EXISTS (SELECT 1 FROM run_outcomes o WHERE o.credential_id = c.id AND o.outcome <> 'rotated'
                              AND o.finished_at > $1::timestamptz - make_interval(hours => ${FAILED_RETRY_HOURS}))) AS failed_lately,
                v.created_at, p.max_age_days, p.escalate_after_days, i.email
           FROM password_policies p
           JOIN credentials c ON c.identity_id = p.identity_id AND c.kind = 'password' AND c.deleted_at IS NULL
           JOIN secret_versions v ON v.credential_id = c.id AND v.version = c.current_version
           JOIN identities i ON i.id = c.identity_id
          WHERE v.created_at < $1::timestamptz - make_interval(hours => 24 * p.max_age_days)`,
        [asOf],
      );
      // As the sweep's selection: a rotation that failed (or ended unreported), was cancelled or was rolled back is tried again a day later, not every hour.
      const managed = rows.filter((r) => r.managed && !r.failed_lately && (!r.window || windowOpen(r.window, asOf))).map((r) => r.id);
      if (managed.length) {
        await deps.pool.query(
          `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id)
           SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c ON CONFLICT DO NOTHING`,
          [input.sweepId, managed],
        );
      }
      let reminded = 0;
      let escalated = 0;
      let failed = 0;
      const unmanaged = rows.filter((r) => !r.managed);
      const settled = await noticesSettled(unmanaged);
      for (const c of unmanaged) {
        heartbeat();
        if (settled.has(c.id)) continue;
        try {
          const told = await remindOverdue(c);
          if (told.reminded) reminded += 1;
          if (told.escalated) escalated += 1;
        } catch (err) {
          // One password whose notices fail for good (an error no retry mends: a bug, a row the
          // outbox refuses) does not hold every later sweep: before, the step was retried without
          // end, the sweep never got to its summaries, expiry reminders and retention, and the
          // schedule skipped every sweep after it. Its notices are tried again by the next sweep
          // (their ids are stable). An outage fails the step, retried as before.
          if (mayPass(err)) throw err;
          failed += 1;
          warn('a password policy notice failed; the next sweep tries it again', { credentialId: c.id, error: err instanceof Error ? err.message : String(err) });
        }
      }
      return { rotating: managed.length, reminded, escalated, ...(failed > 0 ? { failed } : {}) };

      /**
       * The overdue passwords whose notices are all settled: the owners' reminder and the security
       * contacts' escalation (or, the escalation refused, its withheld form) sent or given up. Nothing
       * is left to send for them until a new version (new ids) or the outbox's retention erases the
       * rows; they cost the sweep nothing more (before, ~6 queries each, every sweep, for as long as
       * the password stayed unchanged). A notice still queued is not settled: its delivery is started
       * again, in case the attempt that queued it died first.
       */
      async function noticesSettled(overdue: typeof rows): Promise<Set<string>> {
        const settled = new Set<string>();
        for (let at = 0; at < overdue.length; at += SETTLED_PAGE) {
          const page = overdue.slice(at, at + SETTLED_PAGE).map((c) => ({ id: c.id as string, notices: passwordNoticeIds(c) }));
          const { rows: done } = await deps.pool.query(
            `SELECT id, last_error FROM mail_outbox WHERE id = ANY($1::uuid[]) AND status IN ('sent', 'abandoned')`,
            [page.flatMap(({ notices }) => [notices.reminder, notices.escalation, notices.withheld])],
          );
          const doneIds = new Map<string, string | null>(done.map((row) => [row.id, row.last_error]));
          for (const { id, notices } of page) {
            const escalation = doneIds.get(notices.escalation);
            const escalated = doneIds.has(notices.withheld) || (escalation !== undefined && escalation !== REFUSED_NOTICE);
            if (doneIds.has(notices.reminder) && escalated) settled.add(id);
          }
        }
        return settled;
      }

      /** The owners' reminder of one overdue unmanaged password, and the security contacts' escalation when it is due. */
      async function remindOverdue(c: (typeof rows)[number]): Promise<{ reminded: boolean; escalated: boolean }> {
        const ageDays = Math.floor((asOf.getTime() - c.created_at.getTime()) / DAY_MS);
        const overdueDays = ageDays - c.max_age_days;
        const base = { identityId: c.identity_id, actor: 'schedule:password-policy', credentialId: c.id };
        const text = (extra: string[]) =>
          [
            `The password '${c.name}' is ${ageDays} days old; the password policy allows ${c.max_age_days}.`,
            'It has no rotation policy, so Mailgent cannot change it: store a new value with vault.store, or give it a rotation policy.',
            ...extra,
            '',
            `Credential id: ${c.id}`,
          ].join('\n');
        const ids = passwordNoticeIds(c);
        const reminderId = ids.reminder;
        const reminder = await handOverNotice(deps, {
            ...base,
            id: reminderId,
            purpose: 'password.reminder',
            to: [...c.owners, ...c.notify, ...(c.email ? [c.email] : [])],
            subject: `[mailgent] Password ${c.name} is past its maximum age`,
            text: text([]),
          });
        let escalated = false;
        // The owners get the escalation period to act from when they were told. Owners who could not
        // be told (no address to tell; the reminder refused for carrying a stored value; not delivered
        // since it was queued) get it from when that was tried: before, the security contacts were
        // never told of such a password, however overdue, where no one else could be.
        const row: ReminderRow | undefined = (await deps.pool.query('SELECT status, sent_at, created_at, last_error FROM mail_outbox WHERE id = $1', [reminderId])).rows[0];
        const since = row?.sent_at ?? row?.created_at ?? new Date(c.created_at.getTime() + c.max_age_days * DAY_MS);
        const sinceDays = Math.floor((asOf.getTime() - since.getTime()) / DAY_MS);
        // (A reminder still queued is given a day, its delivery's retries, before it counts as undelivered.)
        if (sinceDays >= c.escalate_after_days && (row?.sent_at || row?.status !== 'queued' || sinceDays >= 1)) {
          const escalationId = ids.escalation;
          const reason = escalationReason(row, since, sinceDays);
          let escalation = await handOverNotice(deps, {
            ...base,
            id: escalationId,
            purpose: 'password.escalation',
            to: [...(deps.securityNotify ?? []), ...(c.email ? [c.email] : []), ...c.owners],
            subject: `[mailgent] ESCALATION: password ${c.name} is ${overdueDays} days overdue`,
            text: text([reason]),
          });
          // Refused for carrying a stored value (its name, or an owner's or the identity's address, is
          // one: what refused the reminder refuses the escalation too): the security contacts get it
          // withheld, ids and ages alone. Before, a password whose reminder was refused so was never
          // escalated to anyone.
          if (!escalation && (await refusedEarlier(deps, escalationId))) {
            escalation = await handOverNotice(deps, {
              ...base,
              id: ids.withheld,
              purpose: 'password.escalation',
              to: deps.securityNotify?.length ? deps.securityNotify : [...(c.email ? [c.email] : []), ...c.owners],
              subject: `[mailgent] ESCALATION: a password is ${overdueDays} days overdue (notice withheld)`,
              text: [
                `Password credential ${c.id} of identity ${c.identity_id} is ${ageDays} days old; the password policy allows ${c.max_age_days}.`,
                'It has no rotation policy, so Mailgent cannot change it. Its escalation was withheld: its name, or an address it would',
                'have gone to, is a value stored in Mailgent.',
                reason.replace(/ It is still unchanged\.$/, ''),
                '',
                `Its owners read its trail with GET /v1/audit?credential=${c.id}.`,
                '',
                `Credential id: ${c.id}`,
              ].join('\n'),
              detail: { withheld: true },
            });
          }
          escalated = Boolean(escalation);
        }
        return { reminded: Boolean(reminder), escalated };
      }
    },

    /** Service accounts with no dependents and no read for `days`, one report per identity per week. */
    async sendOrphanReports(input: { asOf: string; days: number }): Promise<{ sent: number }> {
      return heartbeating(async () => {
        const asOf = new Date(input.asOf);
        const orphans = await findOrphans(deps.pool, { asOf, days: input.days });
        const byIdentity = new Map<string, ServiceAccountRow[]>();
        // Grouped in one pass (before, each account copied its identity's list so far: 50,000 orphans
        // held the worker's event loop for ~30 s, past the heartbeat timeouts of every activity on it).
        for (const o of orphans) {
          const list = byIdentity.get(o.identityId);
          if (list) list.push(o);
          else byIdentity.set(o.identityId, [o]);
        }
        const week = Math.floor(asOf.getTime() / (7 * DAY_MS));
        let sent = 0;
        for (const [identityId, list] of byIdentity) {
          const identity = await deps.identities.get(identityId);
          // The identity's email gets its whole list; an account's owners the accounts they own, in a
          // report of their own (before, every owner got the whole list: accounts of other teams).
          // Addresses compared in lower case (an owner spelled as the identity's email in other case is the same mailbox).
          // Each report's accounts as a set (in the order first listed): an account once however often an owner is named.
          const reports = new Map<string, { to: string; id: string; accounts: Set<ServiceAccountRow> }>();
          if (identity?.email) reports.set(identity.email.toLowerCase(), { to: identity.email, id: stableUuid(`orphans:${identityId}:${week}`), accounts: new Set(list) });
          for (const account of list) {
            for (const owner of account.owners) {
              const key = owner.toLowerCase();
              const report = reports.get(key) ?? { to: owner, id: stableUuid(`orphans:${identityId}:${week}:${key}`), accounts: new Set<ServiceAccountRow>() };
              report.accounts.add(account);
              reports.set(key, report);
            }
          }
          for (const { to, id, accounts } of reports.values()) {
            heartbeat();
            const report = { id, list: [...accounts] };
            const delivery = await handOverNotice(deps, {
              id: report.id,
              identityId,
              purpose: 'orphan.report',
              to: [to],
              subject: `[mailgent] ${report.list.length} service account${report.list.length === 1 ? ' looks' : 's look'} orphaned`,
              text: [
                `These service accounts have no dependents and were not read for ${input.days} days:`,
                '',
                ...report.list.map((o) => `  - ${o.name} (age ${o.ageDays} days, last read ${o.lastReadAt ?? 'never'})`),
                '',
                'Delete the ones nobody uses (DELETE /v1/credentials/<id>), or record their dependents.',
              ].join('\n'),
              actor: 'schedule:orphan-report',
              detail: { accounts: report.list.length },
            });
            if (delivery) sent += 1;
          }
        }
        return { sent };
      });
    },
  };
}
