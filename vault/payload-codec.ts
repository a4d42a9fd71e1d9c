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
 * API and worker process that opens the same database. Each payload gets its own subkey
 * (HKDF over a random 128-bit salt), so the number of payloads never approaches GCM's 2^32
 * random-nonce bound for one key. The key id travels in the payload's metadata.
 */
export const ENCODING = 'binary/encrypted';
export const KEY_ID_HEADER = 'encryption-key-id';
export const CODEC_KEY_NAME = 'payload-codec';

/** The Temporal failure converter module that moves messages and stack traces into encoded attributes. */
export const FAILURE_CONVERTER_PATH = fileURLToPath(new URL('./failure-converter.cjs', import.meta.url));

const SALT_BYTES = 16;
const AAD = 'mailgent/temporal-payload/v1';

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
      const salt = randomBytes(SALT_BYTES);
      const sealed = seal(subkey(key, salt), serialize(payload), AAD);
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
      const plain = open(subkey(key, data.subarray(0, SALT_BYTES)), data.subarray(SALT_BYTES), AAD, 'a Temporal payload');
      return deserialize(plain);
    });
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
