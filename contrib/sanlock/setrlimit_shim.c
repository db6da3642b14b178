/*
 * LD_PRELOAD shim that lets the real sanlock daemon start on machines where
 * RLIMIT_MEMLOCK (and RLIMIT_RTPRIO) cannot be raised, such as the test
 * machines described in ENVIRONMENT.md: sanlock's start-up call
 * setrlimit(RLIMIT_MEMLOCK, unlimited) fails there and the daemon exits.
 *
 * setrlimit() of those two resources reports success without doing anything;
 * every other resource goes to the real setrlimit (dlsym RTLD_NEXT).  Use it
 * only with `sanlock daemon -w 0 -l 0` (no watchdog, no mlockall), for tests.
 * In production systemd's sanlock.service sets the limits and this is not
 * needed.
 *
 * Build: contrib/sanlock/build-shim OUTPUT.so
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
    static setrlimit_fn real;

    if (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)
        return 0;
    if (real == NULL)
        real = (setrlimit_fn)dlsym(RTLD_NEXT, "setrlimit");
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    return real(resource, rlim);
}
