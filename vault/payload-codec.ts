import { createHash, hkdfSync, randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import type { DataConverter, Payload, PayloadCodec } from '@temporalio/common';
import { KeyIntegrityError } from '../core/errors';
import type { Db } from '../db/pool';
import { open, seal } from './crypto';
import type { DataKeys } from './data-keys';

/**
 * Encrypts every Temporal payload — workflow and activity inputs and results, signals, queries,
 * memos, and (with the failure converter below) failure messages and stack traces — before it
 * leaves the process, so the Temporal server and its database only ever hold ciphertext.
 *
 * The key is the `payload-codec` service key: 256 random bits generated once, stored wrapped by the
 * master key (so `rekey` re-wraps it and it never changes under running workflows), shared by every
 * API and worker process that opens the same database. Payloads are sealed under subkeys (HKDF over
 * a random 128-bit salt that travels at the head of the payload), each subkey for at most
 * `PAYLOADS_PER_SUBKEY` payloads, so no key comes near GCM's 2^32 random-nonce bound. A process
 * keeps its current subkey, and remembers the last few it opened, instead of deriving one for every
 * payload (~15 µs of each encode and decode). The key id travels in the payload's metadata.
 */
export const ENCODING = 'binary/encrypted';
export const KEY_ID_HEADER = 'encryption-key-id';
export const CODEC_KEY_NAME = 'payload-codec';

/** The Temporal failure converter module that moves messages and stack traces into encoded attributes. */
export const FAILURE_CONVERTER_PATH = fileURLToPath(new URL('./failure-converter.cjs', import.meta.url));

const SALT_BYTES = 16;
const AAD = 'mailgent/temporal-payload/v1';
/** Payloads one encoding subkey seals before a new salt is drawn (random 96-bit nonces: far under 2^32). */
export const PAYLOADS_PER_SUBKEY = 65_536;
/** Subkeys a codec remembers for decoding: the current ones of the processes it hears from. */
export const OPENED_SUBKEYS = 64;

export interface CodecKey {
  id: string;
  key: Buffer;
}

/** The key id names the key without revealing it: a name and a short hash of the key itself. */
export function codecKeyId(key: Buffer): string {
  return `${CODEC_KEY_NAME}:${createHash('sha256').update('mailgent/key-id').update(key).digest('hex').slice(0, 16)}`;
}

export class EncryptionCodec implements PayloadCodec {
  private loaded?: Promise<CodecKey>;
  /** The subkey this codec seals with, its salt, and how many payloads it has sealed. */
  private sealing?: { salt: Buffer; subkey: Buffer; used: number };
  /** Subkeys derived for decoding, by salt (hex), least recently used first. */
  private readonly opened = new Map<string, Buffer>();

  /** `loadKey` runs once, on first use, and again only if it failed. */
  constructor(private readonly loadKey: () => Promise<CodecKey>) {}

  static fromDataKeys(dataKeys: Pick<DataKeys, 'serviceKey'>, db: Db): EncryptionCodec {
    return new EncryptionCodec(async () => {
      const key = await dataKeys.serviceKey(db, CODEC_KEY_NAME);
      return { id: codecKeyId(key), key };
    });
  }

  private key(): Promise<CodecKey> {
    this.loaded ??= this.loadKey().catch((err) => {
      this.loaded = undefined;
      throw err;
    });
    return this.loaded;
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    const { id, key } = await this.key();
    return payloads.map((payload) => {
      if (!this.sealing || this.sealing.used >= PAYLOADS_PER_SUBKEY) {
        const salt = randomBytes(SALT_BYTES);
        this.sealing = { salt, subkey: subkey(key, salt), used: 0 };
        this.remember(salt.toString('hex'), this.sealing.subkey); // its payloads mostly come back here
      }
      const { salt, subkey: sealingKey } = this.sealing;
      this.sealing.used++;
      const sealed = seal(sealingKey, serialize(payload), AAD);
      return {
        metadata: { encoding: Buffer.from(ENCODING), [KEY_ID_HEADER]: Buffer.from(id) },
        data: Buffer.concat([salt, sealed]),
      };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    const { id, key } = await this.key();
    return payloads.map((payload) => {
      if (text(payload.metadata?.encoding) !== ENCODING) return payload;
      const keyId = text(payload.metadata?.[KEY_ID_HEADER]);
      if (keyId !== id) throw new KeyIntegrityError(`a Temporal payload is encrypted under key '${keyId}', not this deployment's '${id}'`);
      const data = Buffer.from(payload.data ?? []);
      const salt = data.subarray(0, SALT_BYTES);
      const name = salt.toString('hex');
      const known = this.opened.get(name);
      const opening = known ?? subkey(key, salt);
      const plain = open(opening, data.subarray(SALT_BYTES), AAD, 'a Temporal payload');
      // Remembered once it has opened a payload (an altered one's salt is not kept), most recent last.
      if (known) this.opened.delete(name);
      this.remember(name, opening);
      return deserialize(plain);
    });
  }

  /** How many subkeys it remembers for decoding (at most OPENED_SUBKEYS). */
  get heldSubkeys(): number {
    return this.opened.size;
  }

  private remember(name: string, derived: Buffer): void {
    this.opened.set(name, derived);
    if (this.opened.size > OPENED_SUBKEYS) this.opened.delete(this.opened.keys().next().value!);
  }
}

/** The data converter every client, worker and replayer of this deployment must share. */
export function dataConverter(codec: PayloadCodec): DataConverter {
  return { payloadCodecs: [codec], failureConverterPath: FAILURE_CONVERTER_PATH };
}

function subkey(key: Buffer, salt: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', key, salt, AAD, 32));
}

function text(bytes: Uint8Array | null | undefined): string | undefined {
  return bytes ? Buffer.from(bytes).toString('utf8') : undefined;
}

/** A payload as JSON, metadata values and data base64: the codec server protocol's shape, and what is sealed. */
export interface JsonPayload {
  metadata: Record<string, string>;
  data: string;
}

export function payloadToJson(payload: Payload): JsonPayload {
  return {
    metadata: Object.fromEntries(Object.entries(payload.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v).toString('base64')])),
    data: Buffer.from(payload.data ?? []).toString('base64'),
  };
}

export function payloadFromJson(json: Partial<JsonPayload>): Payload {
  return {
    metadata: Object.fromEntries(Object.entries(json.metadata ?? {}).map(([k, v]) => [k, Buffer.from(v, 'base64')])),
    data: Buffer.from(json.data ?? '', 'base64'),
  };
}

function serialize(payload: Payload): Buffer {
  return Buffer.from(JSON.stringify(payloadToJson(payload)));
}

function deserialize(plain: Buffer): Payload {
  const parsed = JSON.parse(plain.toString('utf8')) as JsonPayload;
  plain.fill(0);
  return payloadFromJson(parsed);
}
