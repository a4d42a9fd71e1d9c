import nodemailer from 'nodemailer';
import { parseConnectionUrl } from 'nodemailer/lib/shared';

/** Sends one message over SMTP. A stable Message-ID lets receivers drop a resent duplicate. */
export interface OutgoingMail {
  id: string;
  to: string[];
  subject: string;
  text: string;
  html?: string | null;
}

/** A recipient the SMTP server refused, with its reply (e.g. "550 5.1.1 … mailbox unavailable"). */
export interface RefusedRecipient {
  address: string;
  reply: string;
  /**
   * A 4xx reply: not a refusal but "try again later" (greylisting, a full queue or mailbox, too many
   * recipients in one transaction). The message is sent to it again (mail/outbox.ts).
   */
  temporary?: boolean;
}

/**
 * What the server took. A message is delivered once any recipient is accepted: the server has it for
 * them, so sending it again would only duplicate it. `refused` lists the others.
 */
export interface SendReport {
  accepted: string[];
  refused: RefusedRecipient[];
}

export interface Mailer {
  /** Resolves once the server accepted the message for at least one recipient; throws otherwise. */
  send(mail: OutgoingMail): Promise<SendReport>;
  close(): void;
}

/** The parts of nodemailer's result and errors that say which recipients were refused and why. */
interface Refusals {
  accepted?: unknown[];
  rejected?: unknown[];
  rejectedErrors?: { recipient?: string; response?: string; responseCode?: number }[];
}

export function createMailer(smtpUrl: string, from: string): Mailer {
  // Per-exchange timeouts well inside a delivery attempt's start-to-close (workflows/options.ts), so
  // a hung relay fails the attempt and the activity retries, instead of the attempt being abandoned.
  const transport = nodemailer.createTransport({ ...parseConnectionUrl(smtpUrl), connectionTimeout: 10_000, greetingTimeout: 10_000, socketTimeout: 20_000 });
  return {
    async send(mail) {
      let info: Refusals;
      try {
        info = await transport.sendMail({
          from,
          to: mail.to,
          subject: mail.subject,
          text: mail.text,
          html: mail.html ?? undefined,
          messageId: `<${mail.id}@mailgent>`,
        });
      } catch (err) {
        // nodemailer fails the message only when every recipient was refused; name them.
        const refused = refusals(err as Refusals);
        if (refused.length === 0) throw err;
        throw Object.assign(new Error(`the SMTP server refused every recipient: ${describeRefused(refused)}`), { refused, cause: err });
      }
      return { accepted: (info.accepted ?? []).map(addressOf), refused: refusals(info) };
    },
    close: () => transport.close(),
  };
}

function refusals(r: Refusals): RefusedRecipient[] {
  const errors = new Map((r.rejectedErrors ?? []).map((e) => [e.recipient, e]));
  return (r.rejected ?? []).map(addressOf).map((address) => {
    const error = errors.get(address);
    const reply = error?.response ?? '';
    const code = error?.responseCode ?? Number(/^\d{3}/.exec(reply)?.[0]);
    return { address, reply: reply.slice(0, 200), ...(code >= 400 && code < 500 ? { temporary: true } : {}) };
  });
}

function addressOf(a: unknown): string {
  return typeof a === 'string' ? a : String((a as { address?: unknown }).address ?? a);
}

/** "a@x (550 5.1.1 no such user), b@y (…)": for last_error and failure messages. */
export function describeRefused(refused: RefusedRecipient[]): string {
  return refused.map((r) => (r.reply ? `${r.address} (${r.reply})` : r.address)).join(', ');
}
