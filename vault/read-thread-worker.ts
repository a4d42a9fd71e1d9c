import { parentPort, workerData } from 'node:worker_threads';
import { createPool } from '../db/pool';
import { DataKeys } from './data-keys';
import { Keyring } from './keyring';
import type { FromThread, ReadCall, ReadReply, ReadThreadData, ToThread } from './read-thread';
import { sendError, VAULT_QUERY_TIMEOUT_MS } from './read-thread';
import { FINGERPRINT_KEY, SecretStore } from './secret-store';
import { Vault } from './vault';

/** The vault thread (see read-thread.ts): a Vault of its own answering the calls it is sent. */

const port = parentPort!;
const data = workerData as ReadThreadData;
const post = (m: FromThread) => port.postMessage(m);
const clock = () => new Date();

// Every statement here is a vault call's (a batch's read, seal, write or audit row): one that goes
// unanswered fails the calls waiting on it with a 503 after VAULT_QUERY_TIMEOUT_MS, instead of
// holding them, and every call queued behind them, for as long as the database does not answer.
const pool = createPool(
  data.databaseUrl,
  data.poolSize,
  { warn: (o, msg) => post({ type: 'log', msg, err: o.err === undefined ? undefined : sendError(o.err) }) },
  { queryTimeoutMs: VAULT_QUERY_TIMEOUT_MS },
);
const dataKeys = new DataKeys(pool, Keyring.fromSetting(data.keyringSetting), { maxEncryptions: data.maxEncryptionsPerKey });
const vault = new Vault(pool, new SecretStore(dataKeys, clock), clock);

let replies: ReadReply[] = [];
/** Calls received and not yet answered (counted on arrival, so a close that follows them waits for them). */
let inFlight = 0;

// Service keys first (see DataKeys.warm), then the calls: a call that arrives before is held until
// then. The calling thread takes a thread that stopped before saying it was ready for one that ran
// nothing (a store it was sent is "could not start; try again", not "may have been committed"),
// so nothing may run before it says so.
const warmed = dataKeys.warm([FINGERPRINT_KEY]).then(
  () => undefined,
  () => undefined,
);
void warmed.then(() => post({ type: 'ready' }));
let closing = false;

// Replies made in the same turn cross in one message.
function reply(r: ReadReply): void {
  if (replies.length === 0) setImmediate(flush);
  replies.push(r);
}

function flush(): void {
  if (replies.length === 0) return;
  const out = replies;
  replies = [];
  post({ type: 'replies', replies: out, stats: { reads: vault.readBatchStats(), stores: vault.storeBatchStats() } });
  if (closing && inFlight === 0) void end();
}

port.on('message', (m: ToThread) => {
  if (m.type === 'close') {
    closing = true;
    if (inFlight === 0 && replies.length === 0) void end();
    return;
  }
  if (m.type !== 'calls') return;
  inFlight += m.calls.length;
  void warmed.then(() => m.calls.forEach(run));
});

function run(c: ReadCall): void {
  let call: Promise<unknown>;
  try {
    if (c.op === 'ping') call = pool.query('SELECT 1').then(() => undefined);
    else if (c.op === 'store') call = vault.store(c.caller, c.input);
    else call = c.op === 'get' ? vault.get(c.caller, c.ref, c.version, c.detail) : c.op === 'masked' ? vault.getMasked(c.caller, c.ref, c.version) : vault.totp(c.caller, c.ref);
  } catch (err) {
    // A malformed call fails alone; it must not end the thread and the other calls with it.
    call = Promise.reject(err);
  }
  call.then(
    (value) => reply({ id: c.id, ok: true, value }),
    (err: unknown) => reply({ id: c.id, ok: false, error: sendError(err) }),
  ).finally(() => (inFlight -= 1));
}

let ending: Promise<void> | undefined;
function end(): Promise<void> {
  ending ??= pool.end().finally(() => port.close());
  return ending;
}

