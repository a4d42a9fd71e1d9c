export { rotateCredential, progressQuery } from './rotate-credential';
export { deliverMail } from './deliver-mail';
