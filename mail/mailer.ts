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

export interface Mailer {
  send(mail: OutgoingMail): Promise<void>;
  close(): void;
}

export function createMailer(smtpUrl: string, from: string): Mailer {
  // Timeouts well inside the delivery activity's 30 s start-to-close (workflows/options.ts), so a
  // hung relay fails the attempt and the activity retries, instead of the attempt being abandoned.
  const transport = nodemailer.createTransport({ ...parseConnectionUrl(smtpUrl), connectionTimeout: 10_000, greetingTimeout: 10_000, socketTimeout: 20_000 });
  return {
    async send(mail) {
      const info = await transport.sendMail({
        from,
        to: mail.to,
        subject: mail.subject,
        text: mail.text,
        html: mail.html ?? undefined,
        messageId: `<${mail.id}@mailgent>`,
      });
      if (info.rejected.length > 0) {
        throw new Error(`the SMTP server refused ${info.rejected.length} of ${mail.to.length} recipients`);
      }
    },
    close: () => transport.close(),
  };
}
