import { workerKillSuite } from './worker-kill';

/** SIGKILL once the new value is live: promote, notify, grace, revoke previous. */
workerKillSuite(['promote', 'notify', 'grace', 'revoke_previous']);
