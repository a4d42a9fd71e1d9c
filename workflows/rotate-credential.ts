import {
  ActivityCancellationType,
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  condition,
  continueAsNew,
  isCancellation,
  patched as patchMarker,
  proxyActivities,
  setHandler,
  sleep,
  workflowInfo,
} from '@temporalio/workflow';
import type { createActivities } from '../activities';
import { leakSignal, progressQuery, rollbackUpdate } from './definitions';
import { compensation, externalCall, noticeDelivery, rotationDatabaseStep } from './options';
import {
  CANCEL_WHILE_PLANNING,
  GRACE_BESIDE_NOTICE,
  CANCELLED_CALLS_FINISH_FIRST,
  CLOSE_INCIDENTS_LAST,
  LEAKED_VERSIONS_ANSWERED,
  NOTICE_FAILURES_CONTINUE,
  ROLLBACK_CHECKS_FIRST,
  LEAK_OUTLIVES_CANCEL,
  LEAKS_COUNTED_AT_OUTCOME,
  ROLLBACK_ANSWER_OUTLIVES_CANCEL,
  ROLLBACK_REVOKE_FAILURES_CONTINUE,
  SUPERSEDED_AFTER_FINAL_NOTICE,
  SUPERSEDED_ANSWERED,
  UNROTATED_LEAKS_TOLD,
  UNVERSIONED_NOT_REVOKED,
  OLDER_LEAKS_BEFORE_CLOSE,
  LEAK_REVOKES_BEFORE_PROMOTED,
  RESTORES_AT_ONCE,
  ABANDONED_LEAKS_REVOKED,
  PENDING_KEPT_UNDER_DEPENDENTS,
  ROTATION_PATCHES_AT_START,
  ROTATION_PATCHES_BEFORE_START,
} from './patches';
import type { NoticeKind, RotationMode, RotationNotice, RotationOutcome, RotationProgress, StepName } from './types';

type Activities = ReturnType<typeof createActivities>;
const external = proxyActivities<Activities>(externalCall);
/**
 * The same calls, but a cancel waits for the one in flight to end (it is aborted if it can be: the
 * activity's HTTP calls follow its cancellation) before the workflow goes on to undo it: an undo
 * must not run beside the call it undoes. See CANCELLED_CALLS_FINISH_FIRST.
 */
const externalFinishing = proxyActivities<Activities>({ ...externalCall, cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED });
const undo = proxyActivities<Activities>(compensation);
const db = proxyActivities<Activities>(rotationDatabaseStep);
const mail = proxyActivities<Activities>(noticeDelivery);

export interface RotateCredentialInput {
  rotationId: string;
  identityId: string;
  credentialId: string;
  mode?: RotationMode;
  /** Attempts made by earlier runs of this rotation (continue-as-new): keeps each attempt's idempotency key unique. */
  attemptsBefore?: number;
  /**
   * Versions reported leaked to an earlier run of this rotation that it did not revoke (values stored
   * while it ran, replaced since; a run cancelled before promotion revokes none), left to this run:
   * the one it replaces is revoked as its previous version, older ones with it (revokeOlderLeaks).
   */
  leakedVersions?: number[];
  /**
   * The leak incidents earlier runs of this rotation heard (signalled, or found open and unheard at
   * their end): this run closes them at its end, as its own. An open incident no run heard (its
   * reporter lost Temporal before the signal, and did not report again) is not closed unanswered:
   * the run that finds it rotates again, in leak mode, with it here.
   */
  heardIncidents?: string[];
}

const STEPS: StepName[] = ['create_pending', 'apply_dependents', 'verify', 'compensate', 'promote', 'notify', 'grace', 'revoke_previous'];

const LEAK_WINS = 'a leak was reported: the previous version is being revoked, not made current again';

interface Undo {
  what: string;
  run: () => Promise<unknown>;
}

/**
 * Rotates one credential: create pending → apply to dependents → verify → promote → grace →
 * revoke previous, with a notice for every outcome. A failure before promote undoes what was done
 * (dependents restored, pending discarded at the provider) and tries again with a new value, up to
 * the policy's maxAttempts; then the rotation fails and the owners are told. A leak signal skips
 * the grace period; a rollback update (during grace) makes the previous version current again;
 * cancelling compensates the same way.
 */
export async function rotateCredential(input: RotateCredentialInput): Promise<RotationProgress> {
  // Asked first, before any command: a run started under it takes every patch it stands for
  // without a marker each; one recorded before it asks each as it did (ROTATION_PATCHES_AT_START).
  const atStart = patchMarker(ROTATION_PATCHES_AT_START);
  const patched = (patchId: string): boolean => (atStart && ROTATION_PATCHES_BEFORE_START.has(patchId)) || patchMarker(patchId);
  const ids = { rotationId: input.rotationId, identityId: input.identityId, credentialId: input.credentialId, workflowId: workflowInfo().workflowId };
  /** The grace notice, sent beside the grace period (GRACE_BESIDE_NOTICE): waited for before any notice after it, and the run's end. */
  let graceNotice: Promise<unknown> | undefined;
  const progress: RotationProgress = {
    state: 'running',
    mode: input.mode ?? 'requested',
    attempt: input.attemptsBefore ?? 0,
    steps: STEPS.map((name) => ({ name, state: 'waiting' })),
  };
  let leak = progress.mode === 'leak';
  let rollbackRequested = false;
  let rolledBack: { current: number; abandoned: number } | undefined;
  /** The provider would not forget the version a rollback abandoned: it may still work there. */
  let abandonedNotRevoked = false;
  /** A rollback could not put a dependent back on the previous version. */
  /** A rollback left the abandoned version working: a dependent it could not put back still uses it (see forget). */
  let abandonedKept = false;
  let restoresFailed = false;
  /** Why the vault refused the rollback (a newer value was stored during grace), if it did. */
  let rollbackRefusal: string | undefined;
  /**
   * The version current once the previous one was revoked, when newer than the one this run made (a
   * value stored while it ran replaced it): see SUPERSEDED_ANSWERED.
   */
  let supersededBy: number | undefined;
  /** Its superseded notice went out; the replaced version, reported leaked, has had its revoke tried. */
  let supersededTold = false;
  let supersededLeakRevoked = false;
  // What went wrong without stopping the run (an undo, a promoted event): its notice lists them.
  const problems: string[] = [];
  setHandler(progressQuery, () => progress);
  const leakedVersions = new Set<number>(input.leakedVersions ?? []);
  /** Versions this run has revoked at the provider (a leaked one not among them is left to the next run). */
  const revokedHere = new Set<number>();
  /** Leaked versions older than the one replaced whose revoke revokeOlderLeaks has tried (see olderUntried). */
  const olderTried = new Set<number>();
  const revoke = async (version: number, extra: { current?: number; currentNow?: boolean } = {}) => {
    await undo.revokeVersion({ ...ids, version, ...extra });
    revokedHere.add(version);
  };
  // One per leak incident: a signal delivered twice is one report. In the order they came, each with the version reported.
  // An incident an earlier run of this rotation heard is not a new report here (its report followed it).
  const heardBefore = new Set<string>(input.heardIncidents ?? []);
  const incidents = new Set<string>();
  const reports: { version?: number }[] = [];
  /**
   * A report heard here named no version (an incident from before versions were recorded): it is of
   * the current one. Only rotatedNow reads it (a leak of the credential told as not rotated).
   */
  let unversionedReport = (input.leakedVersions ?? []).some((v) => typeof v !== 'number');
  const hear = ({ incidentId, version }: { incidentId: string; version?: number }) => {
    leak = true;
    if (!incidents.has(incidentId) && !heardBefore.has(incidentId)) {
      reports.push({ version });
      incidents.add(incidentId);
    }
    progress.leakReported = true;
    if (version !== undefined) leakedVersions.add(version);
    if (typeof version !== 'number') unversionedReport = true;
  };
  setHandler(leakSignal, hear);
  const heard = () => [...new Set([...heardBefore, ...incidents])];
  setHandler(
    rollbackUpdate,
    async () => {
      rollbackRequested = true;
      const settled = () => condition(() => rolledBack !== undefined || rollbackRefusal !== undefined || progress.state !== 'grace');
      // A cancel of the run (which rolls back too) does not cut the wait short: the rollback goes on
      // and is answered as it ends. Before, it was answered refused ("Workflow cancelled") and done all the same.
      await (patched(ROLLBACK_ANSWER_OUTLIVES_CANCEL) ? CancellationScope.nonCancellable(settled) : settled());
      if (!rolledBack) {
        const message = leak ? LEAK_WINS : (rollbackRefusal ?? 'the rotation left its grace period before the rollback ran');
        throw ApplicationFailure.create({ type: 'RollbackNotPossible', message });
      }
      return rolledBack;
    },
    {
      validator: () => {
        // The state stays 'grace' until the rollback has finished: without this a second request would be answered as a success.
        if (rollbackRequested) throw new Error(rollbackRefusal ?? 'a rollback was already requested; the previous version is current again');
        if (leak) throw new Error(LEAK_WINS);
        if (progress.state !== 'grace') throw new Error(`rollback is possible only during the grace period; the rotation is ${progress.state}`);
      },
    },
  );

  const stepOf = (name: StepName) => progress.steps.find((s) => s.name === name)!;
  /**
   * The version a value stored while an attempt was pending made current (promote refused it): the
   * attempt's undo puts the dependents and the provider on that one, not on the version it began from.
   */
  let movedTo: number | undefined;
  /** Puts a dependent back on `version` (read when the undo runs), away from `abandoned` (an attempt's undo, or a rollback's). */
  const restoreOf = (dependent: { index: number; type: string }, version: number | (() => number), abandoned: number, unapplied?: () => boolean): Undo => ({
    what: `restore ${dependent.type} ${dependent.index}`,
    run: () =>
      undo.restoreDependent({ ...ids, index: dependent.index, version: typeof version === 'function' ? version() : version, abandoned, ...(unapplied?.() ? { unapplied: true } : {}) }),
  });
  const step = async <T>(name: StepName, run: () => Promise<T>): Promise<T> => {
    const entry = stepOf(name);
    entry.state = 'running';
    entry.attempt = progress.attempt;
    delete entry.error;
    try {
      const result = await run();
      entry.state = 'done';
      return result;
    } catch (err) {
      entry.state = 'failed';
      entry.error = failureMessage(err);
      throw err;
    }
  };
  const skip = (...names: StepName[]) => names.forEach((n) => (stepOf(n).state = 'skipped'));
  // A leak reported while the rotation ran concerns its outcome too: the security contacts get the notice.
  const notice = (outcome: NoticeKind, extra: Partial<RotationNotice> = {}) =>
    mail.sendRotationNotice({
      ...ids,
      outcome,
      mode: leak ? 'leak' : progress.mode,
      fromVersion: progress.fromVersion,
      toVersion: progress.toVersion,
      ...(problems.length > 0 ? { problems: [...problems] } : {}),
      ...(stepOf('revoke_previous').state === 'failed' ? { previousNotRevoked: true } : {}),
      ...(abandonedNotRevoked ? { abandonedNotRevoked: true } : {}),
      ...(abandonedKept ? { abandonedKept: true } : {}),
      restoresFailed,
      ...(unrotated
        ? {
            unrotatedLeaks: {
              revoked: [...unrotated.revoked].sort((a, b) => a - b),
              live: [...unrotated.live].filter((v) => !revokedHere.has(v)).sort((a, b) => a - b),
              failed: [...unrotated.failed],
            },
          }
        : {}),
      ...extra,
    });
  // Runs recorded before this patch failed when a notice could not be sent (after a day of SMTP
  // retries, or at once when the notice would carry a stored value), wherever that happened: after
  // a promote it left the old value unrevoked and a leak incident open. A notice that cannot be sent
  // is now one of the run's problems, and the rotation goes on.
  const noticeFailuresContinue = patched(NOTICE_FAILURES_CONTINUE);
  const calls = patched(CANCELLED_CALLS_FINISH_FIRST) ? externalFinishing : external;
  /** A cancel that came while a call ran (and was let finish first): the attempt is undone all the same. */
  const cancelledMeanwhile = () => calls === externalFinishing && CancellationScope.current().consideredCancelled;
  /**
   * Sends a notice, as the `notify` step unless `asStep` is false; see NOTICE_FAILURES_CONTINUE.
   * Returns its activity's answer, or undefined if it could not be sent.
   */
  const tell = async (kind: NoticeKind, extra: Partial<RotationNotice> = {}, asStep = true) => {
    try {
      return await (asStep ? step('notify', () => notice(kind, extra)) : notice(kind, extra));
    } catch (err) {
      if (!noticeFailuresContinue) throw err;
      problems.push(`the ${kind} notice could not be sent: ${failureMessage(err)}`);
      return undefined;
    }
  };
  /** Versions reported leaked that this run has not revoked, oldest first. */
  const leftLeaks = () => [...leakedVersions].filter((v) => !revokedHere.has(v)).sort((a, b) => a - b);
  /**
   * The next run of this rotation, in leak mode: it rotates the current version. Versions reported
   * leaked that this run has not revoked (values stored while it ran, replaced since; one an earlier
   * run left to it) go with it: it revokes the one it replaces, and older ones with it.
   */
  const nextRun = (): RotateCredentialInput => {
    const left = leftLeaks();
    const { leakedVersions: _given, heardIncidents: _heard, ...rest } = input;
    const incidentsHeard = heard();
    return {
      ...rest,
      mode: 'leak',
      attemptsBefore: progress.attempt,
      ...(left.length > 0 ? { leakedVersions: left } : {}),
      ...(incidentsHeard.length > 0 ? { heardIncidents: incidentsHeard } : {}),
    };
  };
  /**
   * How rotatedNow answered the leaks of a credential it found not rotated now (undefined: it has not
   * had to): the leaked versions it revoked (replaced since), those it told as still live (a revoke
   * that failed leaves its version among them), the revokes that failed, every version answered
   * (asked again only for others) and how many incidents had been heard then (asked again once more
   * have been: the credential may have been restored meanwhile, and is then rotated again, not told).
   */
  let unrotated: { revoked: Set<number>; live: Set<number>; failed: string[]; answered: Set<number>; heard: number } | undefined;
  /**
   * Whether the credential may be rotated again, in leak mode, for the leaks this run leaves
   * unanswered (see UNROTATED_LEAKS_TOLD): not when it was deleted, or its policy taken away, while
   * the run went on (the next run would fail at its plan). Those leaks are then answered here: a
   * leaked version replaced since (older than the current one) is revoked, as the next run would
   * have revoked it, and the versions still live (the current one, whose replacement a deleted
   * credential does not get) are told as a report of them now would tell them: deleted (or no
   * policy), so not rotated; revoke it by hand, or restore it and report again. The current version
   * is told only for a report that named none: a leak of one version is never told as another's.
   */
  const rotatedNow = async (): Promise<boolean> => {
    if (!patched(UNROTATED_LEAKS_TOLD)) return true;
    // (A report resumed from an incident that recorded no version may carry null: it named none.)
    const left = () => leftLeaks().filter((v) => typeof v === 'number');
    if (unrotated && unrotated.heard === heard().length && left().every((v) => unrotated!.answered.has(v))) return false;
    return CancellationScope.nonCancellable(async () => {
      const heardThen = heard().length;
      const { rotated, current } = await db.rotatedNow(ids);
      if (rotated) return true;
      const answer = (unrotated ??= { revoked: new Set(), live: new Set(), failed: [], answered: new Set(), heard: heardThen });
      const replaced = left().filter((v) => current !== null && v < current);
      const revokes = replaced.map((version) => ({ what: `revoking the leaked version ${version} (it may still work)`, run: () => revoke(version) }));
      for (const failure of await runAll(revokes)) if (!answer.failed.includes(failure)) answer.failed.push(failure);
      for (const version of replaced) if (revokedHere.has(version)) answer.revoked.add(version);
      // What is left after the revokes: still live, told (none left: nothing is told, nor asked of the activity).
      const live = [...new Set([...left(), ...(unversionedReport && current !== null ? [current] : [])])].sort((a, b) => a - b);
      if (live.length > 0) {
        const { told } = await db.tellUnrotatedLeaks({ ...ids, versions: live, heard: heard() });
        for (const version of told) answer.live.add(version);
      }
      for (const version of live) answer.answered.add(version);
      answer.heard = heardThen;
      return false;
    });
  };
  /**
   * Closes the credential's leak incidents once the final notice is out. An incident reported after
   * the first `seen` is not covered by that notice: the credential is rotated again, in leak mode
   * (its incident stays open until that run closes it).
   */
  const closeIncidents = async (seen: number, rotateAgain = false) => {
    // A late report of the version this run made, replaced since, is answered by revoking it
    // (answerSuperseded), not by rotating the stored value, which did not leak. See SUPERSEDED_AFTER_FINAL_NOTICE.
    const answeredLate = () =>
      supersededBy !== undefined && reports.slice(seen).every((r) => r.version === progress.toVersion) && patched(SUPERSEDED_AFTER_FINAL_NOTICE);
    const again = () => rotateAgain || (incidents.size > seen && !answeredLate());
    // The next run rotates the current version; a replaced one reported leaked is this run's to revoke.
    const rotateAgainNow = async () => {
      await answerSuperseded();
      if (await rotatedNow()) await continueAsNew<typeof rotateCredential>(nextRun());
    };
    // Reported late, and answered by revoking the replaced version: revoked now (if it was not yet).
    const answerLate = async () => {
      if (incidents.size > seen) await answerSuperseded();
    };
    if (again()) await rotateAgainNow();
    await answerLate();
    // An open leak incident would make later reports only join it: close it, so they rotate again.
    // Only the incidents this rotation heard: one it never heard (its report lost Temporal before
    // the signal) is heard now, a late report like any other, and answered before it is closed.
    // (A run recorded before the activity answered which ones it left gets no answer: none.)
    for (;;) {
      const closed = await db.closeLeakIncidents({ ...ids, heard: heard() });
      const unheard = closed?.unheard ?? [];
      for (const incident of unheard) hear(incident);
      if (again()) await rotateAgainNow();
      await answerLate();
      if (unheard.length === 0) break;
    }
  };
  /**
   * A cancel (before promotion) stops what it was aimed at, a requested or scheduled rotation, not
   * the answer to a leak reported to it (or a leak rotation a batch joined): the run ends cancelled
   * and the credential is rotated again at once, in leak mode. See LEAK_OUTLIVES_CANCEL.
   */
  const leakOutlivesCancel = () => leak && patched(LEAK_OUTLIVES_CANCEL);
  /** `rotateAgain`: the outcome leaves a reported leak unanswered (a rollback, a cancel), so a leak rotation follows the notice. */
  const finish = async (outcome: RotationOutcome, kind: NoticeKind, error?: string, rotateAgain = false) => {
    progress.error = error ?? progress.error;
    // The reports `rotateAgain` was decided on: one heard from here on is answered by rotating again.
    const decidedOn = patched(LEAKS_COUNTED_AT_OUTCOME) ? incidents.size : undefined;
    await CancellationScope.nonCancellable(async () => {
      await db.recordOutcome({ ...ids, outcome, fromVersion: progress.fromVersion, toVersion: progress.toVersion, error: progress.error });
      const closeLast = patched(CLOSE_INCIDENTS_LAST);
      if (!closeLast) await db.closeLeakIncidents(ids);
      const seen = decidedOn ?? incidents.size;
      // Not said to be rotated again when it will not be (deleted meanwhile: rotatedNow answers the leak instead).
      const again = (rotateAgain || (decidedOn !== undefined && incidents.size > decidedOn)) && outcome === 'cancelled';
      const rotatingAgain = again && (await rotatedNow());
      // A failed leak run, or a cancelled one not rotated again (its undo failed in part), answers its
      // leaks as a cancelled one rotated again does when the credential is not rotated now (deleted,
      // or its policy taken away, while it ran: the step that failed may have been refused for
      // that): a leaked version replaced since revoked, the live ones told as not rotated. Before,
      // only its notice told them.
      if ((outcome === 'failed' || outcome === 'cancelled') && leak && !again) await rotatedNow();
      await tell(kind, {
        graceEndsAt: progress.graceEndsAt,
        error: progress.error,
        step: progress.steps.find((s) => s.state === 'failed')?.name,
        ...(rotatingAgain ? { rotatingAgain: true } : {}),
      });
      if (closeLast) await closeIncidents(seen, rotateAgain);
    });
    progress.state = outcome === 'rotated' ? 'succeeded' : outcome;
  };
  /** The rotation failed for good: the credential is marked, the owners told, the run fails. */
  const fail = async (): Promise<never> => {
    await CancellationScope.nonCancellable(() => db.markRotationState({ ...ids, status: 'rotation_failed' }));
    await finish('failed', 'failed');
    throw ApplicationFailure.create({ type: 'RotationFailed', message: progress.error, nonRetryable: true });
  };
  /** Runs every undo of an attempt even if one fails; false if any did (they are then in `problems`). */
  const compensate = async (stack: Undo[]): Promise<boolean> => {
    const failed = await CancellationScope.nonCancellable(() => step('compensate', () => runAll([...stack].reverse())));
    if (failed.length === 0) return true;
    const entry = stepOf('compensate');
    entry.state = 'failed';
    entry.error = failed.join('; ');
    problems.push(...failed);
    return false;
  };

  let planned: Awaited<ReturnType<typeof db.planRotation>>;
  try {
    // A sweep's run (its first) asks again whether its credential changed since the sweep began: see NotDue.
    // (An older history's plan answered no such thing, and replays as it ran.)
    planned = await db.planRotation(input.mode === 'scheduled' && input.attemptsBefore === undefined ? { ...ids, sinceSweep: true } : ids);
    // A leak heard meanwhile is answered by this run, as by any other: planned as one (the sweep has let the credential go).
    if ('notDue' in planned && leak) planned = await db.planRotation(ids);
  } catch (err) {
    // Nothing was changed yet: record the failure (or the cancel), tell the owners, fail the run.
    progress.error = failureMessage(err);
    skip('create_pending', 'apply_dependents', 'verify', 'compensate', 'promote', 'grace', 'revoke_previous');
    if (isCancellation(err) && patched(CANCEL_WHILE_PLANNING)) {
      await finish('cancelled', 'cancelled', 'the rotation was cancelled', leakOutlivesCancel());
      return progress;
    }
    return fail();
  }
  if ('notDue' in planned) {
    // Out of the sweep, nothing done, no notice.
    skip(...STEPS);
    progress.state = 'not_due';
    progress.error = planned.notDue;
    return progress;
  }
  const plan = planned;
  let pending: { version: number; basedOn: number } | undefined;
  let undoStack: Undo[] = [];

  // create → apply → verify, with a fresh value on every attempt.
  for (;;) {
    progress.attempt += 1;
    undoStack = [];
    const attempt = progress.attempt;
    /** A restore of this attempt's undo failed: a dependent may still use its pending version. */
    let restoreFailed = false;
    // This attempt's pending version, once created: its undo puts the provider on the version it was
    // based on, as the dependents' restores do (a value stored since the plan may be that version).
    let created: { version: number; basedOn: number } | undefined;
    try {
      // (Only the undo's input changes with `created`, not the commands the workflow issues: replay is unaffected.)
      // `keepLive`: a dependent not put back still uses the pending version, so a provider that
      // keeps versions apart leaves it working (discarded, it broke that dependent), the notice
      // saying to revoke it once the dependent is off it. See PENDING_KEPT_UNDER_DEPENDENTS.
      undoStack.push({
        what: 'discard attempt',
        run: async () => {
          // (Not a version reported leaked, as a rollback revokes one all the same.)
          const keepLive = restoreFailed && created !== undefined && !leakedVersions.has(created.version) && patched(PENDING_KEPT_UNDER_DEPENDENTS);
          const result = await undo.discardAttempt({ ...ids, attempt, current: movedTo ?? created?.basedOn ?? plan.currentVersion, ...(keepLive ? { keepLive } : {}) });
          if (result?.kept) abandonedKept = true;
        },
      });
      const staged = await step('create_pending', () => calls.createPendingVersion({ ...ids, attempt }));
      // When the new value was made, for a provider that waits for it to start working: from then,
      // not from each of the verify step's attempts. (Only the activity's input, as above.)
      const madeAt = new Date().toISOString();
      created = staged;
      pending = staged;
      progress.fromVersion = staged.basedOn;
      progress.toVersion = staged.version;
      if (plan.dependents.length === 0) skip('apply_dependents');
      else {
        await step('apply_dependents', async () => {
          for (const dependent of plan.dependents) {
            // Restore is pushed first: a dependent that failed half-way is put back too (restore is idempotent).
            // (`unapplied` once its apply was refused: only the activity's input changes, not the commands.)
            let refused = false;
            const restore = restoreOf(dependent, () => movedTo ?? staged.basedOn, staged.version, () => refused);
            undoStack.push({
              what: restore.what,
              run: () =>
                restore.run().catch((err: unknown) => {
                  restoreFailed = true;
                  throw err;
                }),
            });
            await calls.applyDependent({ ...ids, index: dependent.index, version: staged.version }).catch((err: unknown) => {
              // Refused (the dependent's own answer, before it changed anything): its undo may find nothing there.
              refused = isPermanent(err);
              throw err;
            });
          }
        });
      }
      await step('verify', async () => {
        await calls.verifyVersion({ ...ids, version: staged.version, madeAt });
        for (const dependent of plan.dependents) await calls.verifyDependent({ ...ids, index: dependent.index, version: staged.version });
      });
      // A cancel that came while the last call ran (and let it finish) still undoes the attempt.
      if (cancelledMeanwhile()) throw new CancelledFailure('the rotation was cancelled');
      if (stepOf('compensate').state === 'waiting') skip('compensate');
      break;
    } catch (err) {
      progress.error = failureMessage(err);
      // A call that was cancelled may end in a failure of its own (a timeout) rather than a
      // cancellation: the run was cancelled all the same.
      const cancelled = isCancellation(err) || cancelledMeanwhile();
      // A half-undone attempt is not a base for another one: it ends the run.
      const undone = await compensate(undoStack);
      if (cancelled) {
        await CancellationScope.nonCancellable(() => db.markRotationState({ ...ids, status: undone ? 'active' : 'rotation_failed' }));
        await finish('cancelled', 'cancelled', 'the rotation was cancelled', undone && leakOutlivesCancel());
        return progress;
      }
      if (!undone || progress.attempt - (input.attemptsBefore ?? 0) >= plan.maxAttempts || isPermanent(err)) return fail();
    }
  }

  // From here on the new version is live: finish promotion even if a cancel arrives meanwhile.
  let promoted: Awaited<ReturnType<typeof db.promotePendingVersion>>;
  try {
    promoted = await CancellationScope.nonCancellable(() => step('promote', () => db.promotePendingVersion({ ...ids, version: pending!.version })));
  } catch (err) {
    // Only a refusal (a newer value was stored meanwhile) ends the promote: a database step is
    // retried until the database answers. Anything else is not known to have left nothing promoted,
    // and undoing would revoke what may be the live value: the run fails as it stands.
    if (!isPermanent(err)) throw err;
    progress.error = failureMessage(err);
    movedTo = currentVersionIn(err);
    await compensate(undoStack);
    return fail();
  }
  // A leak's run revokes the leaked value before it tells the dependents of the new one: a slow or
  // unreachable receiver of credential.promoted no longer keeps it working. See LEAK_REVOKES_BEFORE_PROMOTED.
  const revokedFirst = leak && patched(LEAK_REVOKES_BEFORE_PROMOTED);
  if (revokedFirst) {
    skip('grace');
    await revokePrevious();
    await revokeOlderLeaks();
  }
  await CancellationScope.nonCancellable(async () => {
    try {
      await external.dependentsPromoted({ ...ids, version: pending!.version });
    } catch (err) {
      // The new version is current whatever a dependent answers: the owners are told, the rotation goes on.
      problems.push(`telling the dependents that version ${pending!.version} is current failed: ${failureMessage(err)}`);
    }
    await db.recordOutcome({ ...ids, outcome: 'rotated', fromVersion: progress.fromVersion, toVersion: progress.toVersion });
  });

  if (leak || plan.graceSeconds === 0) {
    // No grace: the old value stops working now, then the owners hear about both.
    if (!revokedFirst) {
      skip('grace');
      await revokePrevious();
    }
    await revokeOlderLeaks();
    await learnSuperseded();
    await closeOut();
    return progress;
  }

  progress.graceEndsAt = new Date(Date.parse(promoted.promotedAt) + plan.graceSeconds * 1000).toISOString();
  // Every notice after promotion is sent whole: a cancel meanwhile is taken up by the grace timer (a rollback).
  // The grace period's own timer (runs since ROLLBACK_CHECKS_FIRST): not cut short by a cancel, so a
  // rollback the vault refuses can wait out the rest of it. Since GRACE_BESIDE_NOTICE it starts with
  // the notice, which goes on beside the grace period (a leak or a rollback is not held up by an
  // SMTP outage) and is waited for before the next notice or the run's end.
  let graceOver: Promise<void> | undefined;
  if (patched(GRACE_BESIDE_NOTICE)) {
    graceOver = CancellationScope.nonCancellable(() => sleep(plan.graceSeconds * 1000));
    graceNotice = CancellationScope.nonCancellable(() => tell('rotated', { graceEndsAt: progress.graceEndsAt }));
    // Its failure (only a run without NOTICE_FAILURES_CONTINUE has one) is taken where it is waited for.
    graceNotice.catch(() => undefined);
  } else {
    await CancellationScope.nonCancellable(() => tell('rotated', { graceEndsAt: progress.graceEndsAt }));
    graceOver = patched(ROLLBACK_CHECKS_FIRST) ? CancellationScope.nonCancellable(() => sleep(plan.graceSeconds * 1000)) : undefined;
  }
  progress.state = 'grace';
  let cancelled = false;
  await step('grace', async () => {
    try {
      if (graceOver) await Promise.race([graceOver, condition(() => leak || rollbackRequested)]);
      else await condition(() => leak || rollbackRequested, plan.graceSeconds * 1000);
    } catch (err) {
      if (!isCancellation(err)) throw err;
      cancelled = true;
    }
  });

  // A leak reported with the rollback request (in the same activation) wins: the previous version may be the leaked one.
  if ((rollbackRequested && !leak) || cancelled) {
    rollbackRefusal = await rollBack();
    if (rollbackRefusal === undefined) {
      skip('revoke_previous');
      await graceNotice;
      // A leak reported before the rollback was done (or with the cancel) is not answered by it: the
      // value now current may be the leaked one, so the credential is rotated again, in leak mode.
      await finish('rolled_back', 'rolled_back', cancelled ? 'the rotation was cancelled during its grace period' : 'rolled back on request', leak);
      return progress;
    }
    // A newer value was stored during grace: it is current, and the rotation ends as planned, the
    // rest of its grace period first (consumers may still be on the old value until it ends; a leak
    // still cuts it short).
    problems.push(`the ${cancelled ? 'cancel' : 'rollback'} could not roll back: ${rollbackRefusal}`);
    progress.rollbackRefused = rollbackRefusal;
    if (graceOver) await CancellationScope.nonCancellable(() => Promise.race([graceOver, condition(() => leak)]));
  }

  progress.state = 'running';
  await revokePrevious();
  await revokeOlderLeaks();
  await graceNotice;
  await learnSuperseded();
  if (leak && stepOf('revoke_previous').state === 'done') {
    // The grace notice said the previous version keeps working until graceEndsAt, and the leak
    // alert promised a notice when the rotation is done: tell the owners (and security) it is revoked.
    await CancellationScope.nonCancellable(() => tell('rotated', { mode: 'leak', ...(supersededBy ? { currentVersion: supersededBy } : {}) }, false));
    // That notice may have waited (SMTP down): a value stored meanwhile replaces this run's too.
    await learnSuperseded();
  }
  await closeOut();
  return progress;

  /**
   * The rotated version is abandoned: the vault points back, dependents go back, the provider forgets
   * it. Returns why not, when the vault refuses (a value stored during grace is current now: going
   * back would strand it, and its dependents and provider would be put back on the old value).
   */
  async function rollBack(): Promise<string | undefined> {
    return CancellationScope.nonCancellable(async () => {
      const restores = async () => {
        const items = plan.dependents.map((dependent) => restoreOf(dependent, progress.fromVersion!, progress.toVersion!));
        // All at once: one dependent failing for now (retried for an hour) does not hold up the others. See RESTORES_AT_ONCE.
        const failed = await (patched(RESTORES_AT_ONCE) ? runAllAtOnce(items) : runAll(items));
        if (failed.length > 0) restoresFailed = true;
        return failed;
      };
      // `current`: a provider whose create replaced the live secret (a single PostgreSQL role) puts the previous one back.
      const forget = async () => {
        try {
          // `currentNow`: a provider holding one value is put on the version current when this runs
          // (the rollback answered before it; a value stored since then is current), not on fromVersion.
          // `keepLive`: a dependent that could not be put back still uses the abandoned version, so a
          // provider that keeps versions apart leaves it working (revoked, it broke that dependent on
          // a rollback meant to spare it), the owners told to revoke it once the dependent is off it.
          // Not after a leak: the leaked value must stop. (Runs recorded before it sent none, and
          // read no answer: revoked, as then.)
          const keepLive = restoresFailed && !leak;
          const result = await undo.revokeVersion({ ...ids, version: progress.toVersion!, current: progress.fromVersion!, currentNow: true, ...(keepLive ? { keepLive } : {}) });
          if (result?.kept) abandonedKept = true;
          else revokedHere.add(progress.toVersion!);
        } catch (err) {
          // The rollback is done everywhere else: the run ends rolled back, and its notice says the
          // provider still has the rotated value. See ROLLBACK_REVOKE_FAILURES_CONTINUE.
          if (!patched(ROLLBACK_REVOKE_FAILURES_CONTINUE)) throw err;
          abandonedNotRevoked = true;
          problems.push(`revoking version ${progress.toVersion} at the provider: ${failureMessage(err)}`);
        }
      };
      // Decided once, at the grace period's start: a run that entered grace before the patch (its
      // history has no marker there) keeps the old order even if its rollback comes after a deploy.
      if (!graceOver) {
        problems.push(...(await restores()));
        rolledBack = await db.rollbackVersion({ ...ids, version: progress.toVersion! });
        await forget();
        return undefined;
      }
      let flipped: { current: number; abandoned: number };
      try {
        flipped = await db.rollbackVersion({ ...ids, version: progress.toVersion!, from: progress.fromVersion! });
      } catch (err) {
        if (!isPermanent(err)) throw err;
        return failureMessage(err);
      }
      problems.push(...(await restores()));
      // The rollback update answers once the dependents are back, as before.
      rolledBack = flipped;
      await forget();
      return undefined;
    });
  }

  async function revokePrevious(): Promise<void> {
    try {
      // With compensation's patience (an hour of retries), not a provider call's four attempts: the
      // old value may be a leaked one, and a provider's brief outage must not leave it working.
      await CancellationScope.nonCancellable(() => step('revoke_previous', () => revoke(progress.fromVersion!)));
    } catch (err) {
      // The new value is live and stays so; the owners must revoke the old one by hand.
      progress.error = failureMessage(err);
      await graceNotice;
      await CancellationScope.nonCancellable(() => tell('revoke_failed', { error: progress.error }, false));
    }
  }

  /**
   * A leaked version older than the one this rotation replaced (the previous one, still working when
   * it was reported) is revoked too: revoking only the replaced one would leave the leaked value
   * working. A failure is one of the run's problems. See LEAKED_VERSIONS_ANSWERED.
   */
  async function revokeOlderLeaks(): Promise<void> {
    let older = olderUntried();
    // A report that named no version (null) names none to revoke: see UNVERSIONED_NOT_REVOKED.
    if (older.some((v) => typeof v !== 'number') && patched(UNVERSIONED_NOT_REVOKED)) older = older.filter((v) => typeof v === 'number');
    if (older.length === 0 || !patched(LEAKED_VERSIONS_ANSWERED)) return;
    for (const version of older) olderTried.add(version);
    const revokes = older.map((version) => ({ what: `revoking the leaked version ${version} (it may still work)`, run: () => revoke(version) }));
    problems.push(...(await CancellationScope.nonCancellable(() => runAll(revokes))));
  }

  /** Leaked versions older than the one this run replaced that revokeOlderLeaks has not tried yet (a failed one is a problem, not tried again), oldest first. */
  function olderUntried(): number[] {
    // A leaked version between the one replaced and the one made (abandoned by a rollback and left
    // working, or an earlier attempt's): revoked as an older one. See ABANDONED_LEAKS_REVOKED.
    const between = (v: number) =>
      typeof v === 'number' && progress.toVersion !== undefined && v > progress.fromVersion! && v < progress.toVersion && patched(ABANDONED_LEAKS_REVOKED);
    return [...leakedVersions].filter((v) => (v < progress.fromVersion! || between(v)) && !olderTried.has(v) && !revokedHere.has(v)).sort((a, b) => a - b);
  }

  /**
   * Once the previous version is revoked (or that failed), asks which version is current: a value
   * stored while the run went on (in grace, or between promote and revoke) may have replaced the one
   * it made, which the dependents were given and which still works. See SUPERSEDED_ANSWERED.
   */
  async function learnSuperseded(known?: number): Promise<void> {
    if (supersededBy !== undefined || progress.toVersion === undefined || !patched(SUPERSEDED_ANSWERED)) return;
    try {
      // `known`: a notice's activity has just read it, once the notice was sent; no call is needed.
      const current = known ?? (await CancellationScope.nonCancellable(() => db.currentVersion(ids))).current;
      if (current > progress.toVersion) supersededBy = current;
    } catch {
      // The credential is gone (deleted meanwhile): there is nothing left to tell about it.
    }
  }

  /**
   * The version this run made was replaced while it ran and is left to the owners, who are told:
   * revoked now if it was reported leaked (a leak does not wait for the dependents; `current` puts a
   * provider that holds one value, a single PostgreSQL role, on the version now current), else kept
   * working for the dependents it was given until they are moved. A leak of it reported while the
   * notice went out, or later in the run, is answered the same way, with a notice of its own.
   * Idempotent. See SUPERSEDED_ANSWERED.
   */
  async function answerSuperseded(): Promise<void> {
    if (supersededBy === undefined) return;
    const version = progress.toVersion!;
    const current = supersededBy;
    await CancellationScope.nonCancellable(async () => {
      while (!supersededTold || (leakedVersions.has(version) && !supersededLeakRevoked)) {
        supersededTold = true;
        if (!leakedVersions.has(version)) {
          await tell('superseded', { currentVersion: current }, false);
          continue;
        }
        supersededLeakRevoked = true;
        // `currentNow`: the provider is put on the version current when the revoke runs, which a value stored since `current` was learnt may have replaced.
        const revoking = { what: `revoking the leaked version ${version} (it may still work)`, run: () => revoke(version, { current, currentNow: true }) };
        const failed = await runAll([revoking]);
        problems.push(...failed);
        await tell('superseded', { currentVersion: current, supersededLeaked: true, supersededRevoked: failed.length === 0 }, false);
      }
    });
  }

  async function closeOut(): Promise<void> {
    const toVersion = progress.toVersion;
    await answerSuperseded();
    // An older version reported since revokeOlderLeaks ran (while a revoke, the grace notice or the
    // superseded answer went on) is revoked here, before the run decides below whether to rotate
    // again and counts the incidents it answered: see OLDER_LEAKS_BEFORE_CLOSE. One that could not be
    // revoked after the owners' last notice went out makes the run rotate again (the next run tries
    // it, and tells them).
    let lateRevokes = false;
    let lateFailed = false;
    while (olderUntried().some((v) => typeof v === 'number') && patched(OLDER_LEAKS_BEFORE_CLOSE)) {
      lateRevokes = true;
      const trying = olderUntried().filter((v) => typeof v === 'number');
      const tried = olderTried.size;
      await revokeOlderLeaks();
      if (trying.some((v) => !revokedHere.has(v))) lateFailed = true;
      if (olderTried.size === tried) break;
    }
    // A leak of the superseded version heard while they were revoked.
    if (lateRevokes) await answerSuperseded();
    const lateUntold = () => lateFailed && stepOf('notify').state !== 'waiting';
    // A value stored during grace, newer than the one this rotation made, is current once it ends.
    const newerLeaked = () => toVersion !== undefined && [...leakedVersions].some((v) => v > toVersion) && patched(LEAKED_VERSIONS_ANSWERED);
    // The version this run made, leaked but replaced since, was revoked above: rotating the current one would not stop it.
    const ownLeaked = () => toVersion !== undefined && leakedVersions.has(toVersion) && supersededBy === undefined;
    if ((ownLeaked() || newerLeaked() || lateUntold()) && (await rotatedNow())) {
      // The value this rotation made current (or one stored since) was itself reported leaked: rotate
      // again, in leak mode (unless the credential is not rotated now: rotatedNow has answered it).
      await continueAsNew<typeof rotateCredential>(nextRun());
    }
    await CancellationScope.nonCancellable(async () => {
      const closeLast = patched(CLOSE_INCIDENTS_LAST);
      if (!closeLast) await db.closeLeakIncidents(ids);
      const seen = incidents.size;
      if (stepOf('notify').state === 'waiting') {
        const told = await tell('rotated', supersededBy ? { currentVersion: supersededBy } : {});
        // That notice may have waited (SMTP down): a value stored meanwhile replaces this run's too.
        // Its activity reads the current version once it has sent it (one call fewer a rotation).
        if (patched(SUPERSEDED_AFTER_FINAL_NOTICE)) {
          await learnSuperseded(told?.currentVersion);
          await answerSuperseded();
        }
      }
      if (closeLast) await closeIncidents(seen);
    });
    progress.state = 'succeeded';
  }
}

/** Runs every item at once; returns what failed, each as `what: why`, in the items' order. */
async function runAllAtOnce(items: Undo[]): Promise<string[]> {
  const outcomes = await Promise.all(
    items.map(async (item) => {
      try {
        await item.run();
        return undefined;
      } catch (err) {
        return `${item.what}: ${failureMessage(err)}`;
      }
    }),
  );
  return outcomes.filter((outcome): outcome is string => outcome !== undefined);
}

/** Runs each item in order, every one even after a failure; returns what failed, each as `what: why`. */
async function runAll(items: Undo[]): Promise<string[]> {
  const failed: string[] = [];
  for (const item of items) {
    try {
      await item.run();
    } catch (err) {
      failed.push(`${item.what}: ${failureMessage(err)}`);
    }
  }
  return failed;
}

type Failure = { message?: string; cause?: unknown; type?: string; details?: unknown[] };

/** A failure and its causes, outermost first (ActivityFailure → ApplicationFailure …). */
function* chain(err: unknown): Generator<Failure> {
  for (let e = err as Failure | undefined; e; e = e.cause as Failure | undefined) yield e;
}

/** The current version a version conflict reports (permanentErrorsFail sends the error's fields as details). */
function currentVersionIn(err: unknown): number | undefined {
  for (const e of chain(err)) {
    const found = (e.details?.[0] as { currentVersion?: unknown } | undefined)?.currentVersion;
    if (typeof found === 'number') return found;
  }
  return undefined;
}

function isPermanent(err: unknown): boolean {
  return [...chain(err)].some((e) => e.type === 'unprocessable' || e.type === 'not-found' || e.type === 'version-conflict');
}

/** The innermost message of a failure chain (ActivityFailure → ApplicationFailure). */
function failureMessage(err: unknown): string {
  return [...chain(err)].at(-1)?.message ?? String(err);
}
