// Small C helpers for what Swift cannot import: the CMSG_* macros used to pass
// file descriptors over Unix sockets (SCM_RIGHTS), and peer credentials.
#pragma once
#include <stddef.h>
#include <sys/types.h>

/// Sends `length` bytes plus `fd_count` descriptors in one sendmsg. Returns
/// bytes sent or -1 (errno set). Only the first call of a message carries fds.
ssize_t snapshotd_send_with_fds(int socket_fd, const void *buffer, size_t length,
                                const int *fds, int fd_count);

/// Receives up to `length` bytes and up to `max_fds` descriptors. Returns
/// bytes received (0 on EOF) or -1; `*fd_count` gets the descriptors received.
/// Descriptors beyond `max_fds` are closed, never leaked.
ssize_t snapshotd_recv_with_fds(int socket_fd, void *buffer, size_t length,
                                int *fds, int max_fds, int *fd_count);
