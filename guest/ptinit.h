/* ptinit: the guest's /init (see ptinit.c). */
#ifndef PTINIT_H
#define PTINIT_H
int ptinit_main(void);
/* ptagent.c: the agent daemon forked from the caller, listening before this returns (0). */
int agent_daemon_start(void);
#endif
