/* ptinit: the guest's /init (see ptinit.c). */
#ifndef PTINIT_H
#define PTINIT_H
int ptinit_main(void);
#endif
