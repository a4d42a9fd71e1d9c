export { rotateCredential } from './rotate-credential';
export { rotateBatch, rotationSweep, orphanReport } from './batch';
export { deliverMail } from './deliver-mail';
