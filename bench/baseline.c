/* baseline.c: the bench's yardstick, a minimal C Unix-socket server.
 *
 * What a competent C programmer writes in ~100 lines for Exim's ${readsocket} protocol: one
 * thread, one epoll loop, non-blocking sockets. Each connection's request is read until a
 * newline or EOF (at most 512 bytes), then the fixed answer "pong" (no newline) is written and
 * the connection is closed. Like lookupd it never answers before it has the request (Exim's
 * write races an early close) and a silent client cannot block the others.
 *
 * Usage: baseline SOCKET_PATH    (prints "ready" on stdout once listening; SIGTERM stops it)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_REQ 512
static const char ANSWER[] = "pong";

static unsigned short req_len[MAX_FDS]; /* bytes of request read so far, per fd */

/* Read what is there; return 1 when the request is complete (newline, EOF, cap or error). */
static int request_done(int fd) {
    char buf[MAX_REQ];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0) return 1;
        if (n < 0) return !(errno == EAGAIN || errno == EINTR);
        if (memchr(buf, '\n', (size_t)n)) return 1;
        req_len[fd] += (unsigned short)n;
        if (req_len[fd] >= MAX_REQ) return 1;
    }
}

static void answer_and_close(int fd) {
    ssize_t w = write(fd, ANSWER, sizeof ANSWER - 1); /* fits any socket buffer: one write */
    (void)w;
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]); return 2; }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) { fprintf(stderr, "path too long\n"); return 2; }
    strcpy(addr.sun_path, argv[1]);
    unlink(argv[1]);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("baseline: listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno != EINTR) { perror("baseline: epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd != lfd) {
                if (request_done(fd)) answer_and_close(fd); /* close() also leaves the epoll set */
                continue;
            }
            for (;;) { /* drain the accept queue */
                int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) break;
                if (cfd >= MAX_FDS) { close(cfd); continue; }
                req_len[cfd] = 0;
                /* The client usually wrote before we got here: answer without an epoll trip. */
                if (request_done(cfd)) { answer_and_close(cfd); continue; }
                struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
            }
        }
    }
}
