import { UnprocessableError } from '../../core/errors';
import type { Provider } from '../types';
import { callName, credentialHeader, discardBody, readJson, resolvePath, send, statusError } from './request';
import { httpSettings, type HttpSettings } from './schema';

/**
 * A provider's REST API, described by settings: create mints a key with the admin token (read from
 * the vault) and the idempotency key in a header, so a retried create gets the same key back from
 * a provider that honours it; verify calls the API with the new key; revoke deletes a key by its
 * id (404 = already gone). Redirects are not followed, so headers only go where the settings say.
 */
export const httpApi: Provider<HttpSettings> = {
  name: 'http',
  settings: httpSettings,

  async create({ settings: s, secrets, idempotencyKey }) {
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
    if (typeof value !== 'string' || !value) throw new UnprocessableError(`${callName(call)} answered without a string at ${s.valuePath}`);
    if ((typeof id !== 'string' && typeof id !== 'number') || id === '') {
      throw new UnprocessableError(`${callName(call)} answered without an id (string or number) at ${s.idPath}`);
    }
    return { value, externalId: String(id) };
  },

  async verify({ settings: s, secret }) {
    const call = {
      method: s.verify.method,
      url: s.verify.url,
      headers: { [s.verify.header]: credentialHeader(s.verify.scheme, secret.value, `version ${secret.version}`) },
      timeoutMs: s.timeoutMs,
    };
    const res = await send(call);
    await discardBody(res);
    // Not permanent even on a 4xx: some providers take a moment before a new key works.
    if (!res.ok) throw new Error(`version ${secret.version} does not work: ${statusError(callName(call), res, [secret.value]).message}`);
  },

  async revoke({ settings: s, secrets, secret, idempotencyKey }) {
    if (!secret.externalId) {
      throw new UnprocessableError(`version ${secret.version} has no provider id, so it cannot be revoked through the API; revoke it at the provider by hand`);
    }
    const token = await secrets.read(s.auth.credential);
    const call = {
      method: s.revoke.method,
      url: s.revoke.url.replaceAll('{id}', encodeURIComponent(secret.externalId)),
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
