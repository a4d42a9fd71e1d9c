/**
 * The ids of workflow patches (`patched()`), one per change to what a workflow does that histories
 * recorded before it must still replay. A patch marker in a history holds its id as a plain JSON
 * payload: the SDK's core writes it and the payload codec never sees it, so an id is the fixed name
 * of a code change, never data (test/codec.test.ts allows these and nothing else in the clear).
 */

/**
 * Runs recorded before this patch closed the leak incidents before the final notice; newer runs
 * close them after it, so a leak reported while the notice is sent is not closed unhandled.
 */
export const CLOSE_INCIDENTS_LAST = 'close-leak-incidents-after-notice';

/**
 * Runs recorded before this patch failed when a rotation notice could not be sent; newer runs note
 * it among their problems and go on (revoke, grace, closing the leak incidents).
 */
export const NOTICE_FAILURES_CONTINUE = 'notice-failures-continue';

/**
 * Runs recorded before this patch restored the dependents first and then asked the vault to roll
 * back, which took a value stored during grace for a rollback already done; newer runs ask the vault
 * first (with the version to go back to) and restore nothing when it refuses.
 */
export const ROLLBACK_CHECKS_FIRST = 'rollback-checks-the-vault-first';

/**
 * Runs recorded before this patch went on to undo an attempt as soon as a cancel arrived, while the
 * provider's create or a dependent's update was still running (it could land after its undo); newer
 * runs wait for the cancelled call to end first.
 */
export const CANCELLED_CALLS_FINISH_FIRST = 'cancelled-calls-finish-first';

/**
 * Runs recorded before this patch, cancelled while their rotation was being planned, failed: the
 * credential marked rotation_failed and the owners told of a failure. Newer runs end cancelled, the
 * credential left as it was (nothing had been made yet).
 */
export const CANCEL_WHILE_PLANNING = 'cancel-while-planning-is-a-cancel';

/**
 * Runs recorded before this patch answered a leak only by revoking the version they replaced: a
 * leaked older version (the previous one, still working) was left working, and a leaked version
 * stored during grace (current once the run ends) was neither revoked nor rotated. Newer runs revoke
 * leaked versions older than the one they replaced, and rotate again, in leak mode, when a leaked
 * version is newer than the one they made.
 */
export const LEAKED_VERSIONS_ANSWERED = 'leaked-versions-answered';

/**
 * Runs recorded before this patch failed when the provider would not revoke the version a rollback
 * abandoned (after the vault and the dependents were already back on the previous one): the run
 * failed with no notice and its outcome still said rotated. Newer runs end rolled back, the failure
 * among their problems, and the notice says the rotated value may still work at the provider.
 */
export const ROLLBACK_REVOKE_FAILURES_CONTINUE = 'rollback-revoke-failures-continue';

/**
 * Runs recorded before this patch, cancelled before promotion after a leak was reported to them (or
 * leak rotations a batch had joined, cancelled with that batch), ended cancelled and closed the leak
 * incident with the leaked value still working. Newer runs end cancelled and, when the attempt was
 * undone in full, rotate the credential again at once, in leak mode; the incident stays open until
 * that run closes it.
 */
export const LEAK_OUTLIVES_CANCEL = 'leak-outlives-cancel';

/**
 * Runs recorded before this patch ended quietly when a value stored while they ran on after
 * promotion (in grace, say) had replaced the version they made: that version, given to the
 * dependents, was left working and no one was told; reported leaked, it was answered by rotating
 * the stored value, not it. Newer runs ask which version is current once the previous one is
 * revoked and, when it is newer than theirs, send the owners a `superseded` notice (the version
 * they made still works for the dependents, to be revoked by hand once they are off it), revoking
 * it first if it was reported leaked, then or later in the run.
 */
export const SUPERSEDED_ANSWERED = 'superseded-version-answered';

/**
 * Runs recorded before this patch did not look again, after their final notice (which may wait a
 * day for SMTP), for a value stored meanwhile: the version they made, replaced and still working
 * for the dependents, went untold, and reported leaked then, it was answered by rotating the stored
 * value (not the leaked one), which left it working. Newer runs ask which version is current once
 * that notice is out and answer a replacement as SUPERSEDED_ANSWERED does; a leak of the replaced
 * version reported that late is answered by revoking it, not by rotating the stored value again.
 */
export const SUPERSEDED_AFTER_FINAL_NOTICE = 'superseded-after-final-notice';

/**
 * Runs recorded before this patch sent the grace notice ("version 1 keeps working until …") before
 * their grace period began, and waited for it: SMTP down, a day's retries. A leak reported then was
 * not read until the notice was out, so the leaked previous value kept working all that time (a
 * leak is meant to cut the grace period short at once), and the grace timer began only after the
 * notice, so the old value outlived the time the notice gave. Newer runs start the grace timer and
 * the notice together, and wait for the notice only before the rotation's next notice or its end.
 */
export const GRACE_BESIDE_NOTICE = 'grace-beside-its-notice';

/**
 * Runs recorded before this patch counted the leak reports their outcome answered only once the
 * outcome was recorded: a leak heard while that ran (a rollback's or a cancel's, which had already
 * decided not to rotate again) was taken as answered, its incident closed with the leaked value
 * current and working. Newer runs count them as the outcome is decided: a report heard after that
 * rotates the credential again, in leak mode, as one heard during the final notice does.
 */
export const LEAKS_COUNTED_AT_OUTCOME = 'leaks-counted-when-the-outcome-is-decided';

/**
 * Runs recorded before this patch answered a rollback request as refused ("Workflow cancelled") when
 * the run was cancelled while the rollback ran or before it began, though the cancel rolled back all
 * the same; newer runs answer it when the rollback has ended, as it ended.
 */
export const ROLLBACK_ANSWER_OUTLIVES_CANCEL = 'rollback-answer-outlives-a-cancel';

/**
 * Runs recorded before this patch rotated the credential again, in leak mode, for a leak they could
 * not answer themselves (the version they made reported leaked, a leak heard before a cancel or a
 * rollback, or during the final notice) even when the credential had been deleted (or its policy
 * taken away) while they ran: that run failed at its plan ("is deleted; it is not rotated"), the
 * credential was marked rotation_failed, and the owners and the security contacts were told the
 * rotation had failed and to rotate it again, which a deleted credential cannot be. Newer runs ask
 * first (rotatedNow) and, when it is not rotated now, answer those leaks themselves: a leaked version
 * replaced since is revoked (as the next run would have), the rest told as a report of them now
 * would tell them (tellUnrotatedLeaks: deleted, or no policy, so not rotated), and the run ends as it was.
 * A leak run that fails (a deletion refusing its next step, say) answers its leaks the same way.
 */
export const UNROTATED_LEAKS_TOLD = 'unrotated-leaks-told';

/**
 * Runs recorded before this patch, when a leak signal named no version (null: what a report sends
 * for an incident recorded before versions were, joined later), counted that null among the leaked
 * versions older than the one they replaced, and tried to revoke "version null": the provider's read
 * found no such version, a denied read was audited and the owners' notice listed "revoking the
 * leaked version null (it may still work)" among the run's problems. Newer runs revoke only versions
 * a report named; the report names none older than the one the run replaces.
 */
export const UNVERSIONED_NOT_REVOKED = 'unversioned-leak-not-revoked';

/**
 * Runs recorded before this patch revoked the leaked versions older than the one they replaced once,
 * after revoking that one: an older version reported after that (while a revoke went on, or the grace
 * notice, or the superseded answer) was heard, its incident closed with the others at the run's end,
 * and it kept working. Newer runs revoke such versions too before they count the incidents they
 * answered (closeOut), each once.
 */
export const OLDER_LEAKS_BEFORE_CLOSE = 'older-leaks-revoked-before-close';

/**
 * Sweeps recorded before this patch did not look for leak incidents whose rotation was never
 * started (their report's process died between the incident's commit and the start); newer sweeps
 * start those first (resumeLeakIncidents).
 */
export const SWEEP_RESUMES_LEAKS = 'sweep-resumes-leak-incidents';

/**
 * Batches and sweeps recorded before this patch waited for their runs' outcomes (awaitOutcomes, an
 * activity that lasts as long as the batch) on the rotations' own task queue, each holding one of
 * the worker's activity slots: a hundred batches at once (an agent asking for one rotation per
 * request) held them all, and the rotations they waited for could not run a single step, nor could
 * a leak's revoke or a notice, for the six hours of the wait's timeout. Newer ones wait on a task
 * queue of their own (waitsQueue), whose slots hold nothing but waits.
 */
export const BATCH_WAITS_APART = 'batch-waits-on-their-own-queue';

/**
 * Runs recorded before this patch, in leak mode, told the dependents that the new version is current
 * (credential.promoted: four attempts, each webhook up to its timeout) before revoking the leaked
 * previous value: a slow or unreachable receiver kept the leaked value working for minutes. Newer
 * leak runs revoke the previous version (and older leaked ones) first, then tell the dependents.
 */
export const LEAK_REVOKES_BEFORE_PROMOTED = 'leak-revokes-before-promoted';

/**
 * Runs recorded before this patch put the dependents back one after another on a rollback, each
 * retried for an hour (compensation) while it failed for now: one unreachable receiver held up every
 * dependent after it, the rollback's answer and the provider's revoke. Newer runs put them back all
 * at once, and the rollback waits for the slowest alone.
 */
export const RESTORES_AT_ONCE = 'rollback-restores-at-once';

/**
 * Runs recorded before this patch revoked leaked versions older than the one they replaced, not a
 * leaked version between it and the one they made: one a rollback abandoned and left working (its
 * dependents not put back), or an attempt's, reported leaked later, was closed with its incident
 * while it still worked. Newer runs revoke those too.
 */
export const ABANDONED_LEAKS_REVOKED = 'abandoned-leaks-revoked';

/**
 * Runs recorded before this patch discarded an attempt's pending version at the provider even when
 * the attempt's undo could not put a dependent back (it still used the pending version, which the
 * discard then broke). Newer runs leave it working where the provider keeps versions apart, the
 * notice saying to revoke it once the dependent is off it, as a rollback does.
 */
export const PENDING_KEPT_UNDER_DEPENDENTS = 'pending-kept-under-dependents';

/**
 * Every rotateCredential patch above at once (ROTATION_PATCHES_BEFORE_START). A run started after it
 * records this one marker (and one `TemporalChangeVersion` search-attribute update) and takes every
 * one of their patched branches, where before it recorded a marker and an update for each patch it
 * reached: a rotation's history had 87 events, ten of them those markers and updates of five
 * patches. Runs recorded before it find no marker of it and replay as they were, each patch asked on
 * its own. A patch added after it is not in that list, and is asked on its own in every run (a run
 * started today must replay tomorrow without tomorrow's branch).
 */
export const ROTATION_PATCHES_AT_START = 'rotation-patches-at-start';

/** The patches ROTATION_PATCHES_AT_START stands for: fixed for good (add none). */
export const ROTATION_PATCHES_BEFORE_START: ReadonlySet<string> = new Set([
  CLOSE_INCIDENTS_LAST,
  NOTICE_FAILURES_CONTINUE,
  ROLLBACK_CHECKS_FIRST,
  CANCELLED_CALLS_FINISH_FIRST,
  CANCEL_WHILE_PLANNING,
  LEAKED_VERSIONS_ANSWERED,
  ROLLBACK_REVOKE_FAILURES_CONTINUE,
  LEAK_OUTLIVES_CANCEL,
  SUPERSEDED_ANSWERED,
  SUPERSEDED_AFTER_FINAL_NOTICE,
  GRACE_BESIDE_NOTICE,
  LEAKS_COUNTED_AT_OUTCOME,
  ROLLBACK_ANSWER_OUTLIVES_CANCEL,
  UNROTATED_LEAKS_TOLD,
  UNVERSIONED_NOT_REVOKED,
  OLDER_LEAKS_BEFORE_CLOSE,
  LEAK_REVOKES_BEFORE_PROMOTED,
  RESTORES_AT_ONCE,
  ABANDONED_LEAKS_REVOKED,
  PENDING_KEPT_UNDER_DEPENDENTS,
]);

/** Every patch id a history may hold: rotateCredential's and the batch workflow's. */
export const PATCH_IDS: readonly string[] = [ROTATION_PATCHES_AT_START, ...ROTATION_PATCHES_BEFORE_START, SWEEP_RESUMES_LEAKS, BATCH_WAITS_APART];
