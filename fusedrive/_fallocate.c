/*
 * fusedrive/_fallocate.c: serve FUSE_FALLOCATE beside pyfuse3.
 *
 * pyfuse3 (3.5) fills a struct fuse_lowlevel_ops without a fallocate handler and
 * passes it to libfuse3's fuse_session_new(); libfuse then answers every
 * FUSE_FALLOCATE with ENOSYS and the kernel stops asking (EOPNOTSUPP for good).
 *
 * This library defines fuse_session_new() itself. Loaded with RTLD_GLOBAL before
 * pyfuse3's extension module (fusedrive/fallocate_shim.py does that), it comes
 * first in the global lookup scope, so pyfuse3's call binds here. It copies the
 * operations pyfuse3 passes, adds a fallocate handler if there is none, and calls
 * libfuse3's own fuse_session_new() (found by dlsym on the libfuse3 already
 * loaded). libfuse copies the operations into the session, so one static copy
 * serves the process's one session.
 *
 * The handler hands each request to a callback registered from Python
 * (fusedrive_fallocate_set_handler). libfuse calls it from
 * fuse_session_process_buf(), which pyfuse3 calls on its trio thread with the GIL
 * held: the callback runs there, between trio checkpoints, like pyfuse3's own
 * handlers. The callback must answer every request exactly once, at once or later
 * from the same thread, with fusedrive_fallocate_reply(). With no callback
 * registered the request is answered EOPNOTSUPP (never ENOSYS: that would switch
 * fallocate off for the whole mount).
 *
 * Written against the documented API in libfuse3's public fuse_lowlevel.h
 * (fuse_session_new, the fallocate member of struct fuse_lowlevel_ops,
 * fuse_reply_err); the member's offset comes from the installed header.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <fuse3/fuse_lowlevel.h>

typedef void (*fallocate_handler)(void *req, uint64_t ino, int mode, int64_t offset,
                                  int64_t length, uint64_t fh);
typedef struct fuse_session *(*session_new_fn)(struct fuse_args *args,
                                               const struct fuse_lowlevel_ops *op,
                                               size_t op_size, void *userdata);
typedef int (*reply_err_fn)(fuse_req_t req, int err);

static fallocate_handler handler;
static reply_err_fn reply_err;
static int served; /* a session was created with our fallocate handler */

/* Room for the operations of a libfuse newer than the header compiled here. */
static union {
    struct fuse_lowlevel_ops ops;
    unsigned char bytes[4096];
} patched;

static void on_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                         off_t length, struct fuse_file_info *fi)
{
    fallocate_handler h = handler;
    if (h == NULL) {
        reply_err(req, EOPNOTSUPP);
        return;
    }
    h((void *)req, (uint64_t)ino, mode, (int64_t)offset, (int64_t)length,
      fi != NULL ? (uint64_t)fi->fh : 0);
}

/* libfuse3's own definition of `name`, from the copy this process already loaded. */
static void *libfuse_symbol(const char *name)
{
    void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    void *sym;
    if (lib == NULL)
        return NULL;
    sym = dlsym(lib, name);
    dlclose(lib); /* drops only the reference RTLD_NOLOAD took */
    return sym;
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    session_new_fn real = (session_new_fn)libfuse_symbol("fuse_session_new");
    size_t need = offsetof(struct fuse_lowlevel_ops, fallocate) + sizeof(patched.ops.fallocate);
    struct fuse_session *se;

    if (real == NULL || real == fuse_session_new) {
        errno = ENOSYS;
        return NULL;
    }
    reply_err = (reply_err_fn)libfuse_symbol("fuse_reply_err");
    if (reply_err == NULL || op == NULL || op_size > sizeof(patched.bytes))
        return real(args, op, op_size, userdata);
    memset(&patched, 0, sizeof(patched));
    memcpy(patched.bytes, op, op_size);
    if (op_size >= need && patched.ops.fallocate != NULL)
        return real(args, op, op_size, userdata); /* the caller serves it itself */
    patched.ops.fallocate = on_fallocate;
    se = real(args, &patched.ops, op_size > need ? op_size : need, userdata);
    if (se != NULL)
        served = 1;
    return se;
}

void fusedrive_fallocate_set_handler(fallocate_handler h)
{
    handler = h;
}

int fusedrive_fallocate_reply(void *req, int err)
{
    if (reply_err == NULL) /* no session made here: there is no request to answer */
        return -ENOSYS;
    return reply_err((fuse_req_t)req, err);
}

int fusedrive_fallocate_served(void)
{
    return served;
}
