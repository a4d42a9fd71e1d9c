import { AppError, UnprocessableError } from '../../core/errors';
import type { Provider } from '../types';
import { attemptWaitLimit, sleep } from '../../core/activity-attempt';
import { cancellationOf } from '../../core/outbound-cancel';
import { callName, credentialHeader, discardBody, ProviderRefused, readJson, resolvePath, send, statusError, templateCallName } from './request';
import { httpSettings, newHttpSettings, type HttpSettings } from './schema';

/** The longest pause between two calls of verify to a key that does not work yet. */
const MAX_VERIFY_PAUSE_MS = 10_000;
/** Kept in an attempt beyond verify's last call: a margin for the step's last statements and the clocks (test/unit/options.test.ts counts 30 s of database work). */
const STEP_DATABASE_MS = 30_000;

/** A create answered a key that cannot be stored (no usable value, an id that holds it), which was revoked there and then. */
class UnusableKeyRevoked extends UnprocessableError {}

/**
 * A provider's REST API, described by settings: create mints a key with the admin token (read from
 * the vault) and the idempotency key in a header, so a retried create gets the same key back from
 * a provider that honours it; verify calls the API with the new key; revoke deletes a key by its
 * id (404 = already gone). Redirects are not followed, so headers only go where the settings say.
 */
export const httpApi: Provider<HttpSettings> = {
  name: 'http',
  settings: httpSettings,
  newSettings: newHttpSettings,

  async create(ctx) {
    const { settings: s, secrets, idempotencyKey } = ctx;
    const token = await secrets.read(s.auth.credential);
    const call = {
      method: s.create.method,
      url: s.create.url,
      headers: {
        [s.auth.header]: credentialHeader(s.auth.scheme, token, `the admin credential '${s.auth.credential}'`),
        [s.idempotencyHeader]: idempotencyKey,
      },
      body: s.create.body,
      timeoutMs: s.timeoutMs,
    };
    const res = await send(call);
    if (!res.ok) {
      await discardBody(res);
      throw statusError(callName(call), res, [token]);
    }
    const doc = await readJson(res, callName(call));
    const value = resolvePath(doc, s.valuePath);
    const id = resolvePath(doc, s.idPath);
    if ((typeof id !== 'string' && typeof id !== 'number') || id === '') {
      throw new UnprocessableError(`${callName(call)} answered without an id (string or number) at ${s.idPath}`);
    }
    // A whole number past 2^53 has lost digits in JSON.parse: revoked by it, the key at the provider
    // would be another's (or none: a 404, taken for revoked), and the key made now kept working.
    if (typeof id === 'number' && Number.isInteger(id) && !Number.isSafeInteger(id)) {
      throw new UnprocessableError(
        `${callName(call)} answered an id at ${s.idPath} too large for a JSON number to hold exactly (past 2^53); point idPath at a string id. The key it made may still work at the provider: revoke it there by hand`,
      );
    }
    // The id is kept unencrypted and goes into the revoke URL (and its errors): never the value, nor a part of it.
    if (typeof value !== 'string' || !value || String(id).includes(value)) {
      const unusable = `${callName(call)} ${typeof value !== 'string' || !value ? `answered without a string at ${s.valuePath}` : `answered an id at ${s.idPath} that holds the key's value`}`;
      // A key was made that will never be stored: revoke it now, while its id is at hand. Not
      // revoked for now (a 5xx, down), the step fails for now: its retry sends the create again
      // under its key, which answers the same key, and revokes it then (before, the failure was
      // ignored, and the key left working). (The revoke's own message is not passed on: its URL
      // holds the id, which may hold the value.)
      await httpApi.revoke({ ...ctx, secret: { version: 0, value: '', externalId: String(id) }, idempotencyKey: `${idempotencyKey}:unusable` }).catch((err: unknown) => {
        if (err instanceof AppError) throw new UnprocessableError(`${unusable}; revoking the key it made was refused too: revoke it at the provider by hand`);
        throw new Error(`${unusable}; revoking the key it made failed for now`);
      });
      throw new UnusableKeyRevoked(unusable);
    }
    return { value, externalId: String(id) };
  },

  /**
   * Compensation. A staged key is revoked by its id. Without one, the create may still have made a
   * key whose answer never reached the vault (lost, or every attempt timed out after the provider
   * acted): the create is sent again with its own idempotency key, which a provider that honours it
   * answers with that same key (or, if it never made one, makes one now), and that key is revoked.
   */
  async discard(ctx) {
    if (ctx.pending) return httpApi.revoke({ ...ctx, secret: ctx.pending });
    if (!ctx.createKey) return;
    let made;
    try {
      made = await httpApi.create({ ...ctx, idempotencyKey: ctx.createKey });
    } catch (err) {
      // The provider refused the create sent again (a 4xx other than 401 or 403): it made nothing
      // now, and did not before. Anything else does not say so (the admin token refused or
      // unreadable, the call refused here, an answer it cannot use): before, every refusal of ours
      // counted as "nothing made", and the attempt was taken as undone with a key perhaps left live.
      if (err instanceof ProviderRefused && err.providerStatus !== 401 && err.providerStatus !== 403) return;
      // The create sent again answered a key it could not use, and revoked it: nothing is left to undo.
      if (err instanceof UnusableKeyRevoked) return;
      throw err;
    }
    await httpApi.revoke({ ...ctx, secret: { version: 0, value: made.value, externalId: made.externalId } });
  },

  /**
   * Calls the API with the new key. Some providers take a while before a new key works (eventually
   * consistent IAM): a non-2xx answer or a failed call is tried again, after 1 s, 2 s, 4 s … (at most
   * 10 s apart), until `verify.waitSeconds` have passed since the key was made (`madeAt`, its create
   * step's end; the first call when not given, or given later than it); then the last error is
   * thrown (not permanent even on a 4xx: the step's own attempts try again, one call each once the
   * wait is over: before, each of its four attempts waited the whole of it again). The waits end at
   * once when the activity is cancelled, and never go past what is left of its attempt, less the
   * last call and the step's database work.
   */
  async verify({ settings: s, secret, madeAt }) {
    const call = {
      method: s.verify.method,
      url: s.verify.url,
      headers: { [s.verify.header]: credentialHeader(s.verify.scheme, secret.value, `version ${secret.version}`) },
      timeoutMs: s.timeoutMs,
    };
    const from = Math.min(Date.now(), (madeAt && Date.parse(madeAt)) || Infinity);
    const deadline = Math.min(from + s.verify.waitSeconds * 1000, attemptWaitLimit(s.timeoutMs + STEP_DATABASE_MS));
    for (let delay = 1_000; ; delay = Math.min(delay * 2, MAX_VERIFY_PAUSE_MS)) {
      let failure: unknown;
      try {
        const res = await send(call);
        await discardBody(res);
        if (res.ok) return;
        failure = new Error(`version ${secret.version} does not work: ${statusError(callName(call), res, [secret.value]).message}`);
      } catch (err) {
        // A cancelled activity, or a call refused before it was sent (an address not allowed): no wait mends it.
        if (cancellationOf() || err instanceof AppError) throw err;
        failure = err;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw failure;
      await sleep(Math.min(delay, left));
    }
  },

  async revoke({ settings: s, secrets, secret, idempotencyKey }) {
    if (!secret.externalId) {
      throw new UnprocessableError(`version ${secret.version} has no provider id, so it cannot be revoked through the API; revoke it at the provider by hand`);
    }
    // URLs resolve '.' and '..' segments (encoded or not): such an id would name another endpoint.
    if (/^\.{1,2}$/.test(secret.externalId)) {
      throw new UnprocessableError(`version ${secret.version} has the provider id '${secret.externalId}', which cannot name a key in a URL; revoke it at the provider by hand`);
    }
    const token = await secrets.read(s.auth.credential);
    const call = {
      method: s.revoke.method,
      url: s.revoke.url.replaceAll('{id}', encodeURIComponent(secret.externalId)),
      // Named by its template, {id} unfilled: a policy stored before idPath had to differ from
      // valuePath may revoke by the value itself, which the URL then holds.
      name: templateCallName(s.revoke.method, s.revoke.url),
      headers: {
        [s.auth.header]: credentialHeader(s.auth.scheme, token, `the admin credential '${s.auth.credential}'`),
        [s.idempotencyHeader]: idempotencyKey,
      },
      timeoutMs: s.timeoutMs,
    };
    const res = await send(call);
    await discardBody(res);
    if (!res.ok && res.status !== 404) throw statusError(callName(call), res, [token, secret.value]);
  },
};
