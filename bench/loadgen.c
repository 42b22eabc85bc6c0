/* loadgen.c: drive a ${readsocket} server exactly as Exim does, from N threads.
 *
 * Every query opens a NEW connection: socket, connect, one write() of the request,
 * shutdown(SHUT_WR) (unless --no-shutdown, Exim's shutdown=no), read until EOF, close.
 * The run stops at --duration seconds or after --count queries, whichever comes first, and
 * prints one JSON object: queries, errors, qps, latency percentiles in microseconds, and the
 * first unexpected answer or error (to diagnose, not to count twice).
 *
 * Usage: loadgen (--unix PATH | --tcp HOST:PORT) [--threads N] [--duration S] [--count N]
 *                [--timeout S] [--expect ANSWER] [--no-shutdown] [--newline]
 *                [--requests-file F] [REQUEST]
 * REQUEST is sent as given (default "ping"); --newline appends "\n". --requests-file cycles
 * through the file's lines (sent without their newline, unless --newline) instead.
 * --timeout (default 5 s, Exim's readsocket default) bounds connect, write and each read;
 * a query that hits it counts as an error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_ANSWER 4096

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static int g_family;
static char **g_requests;
static size_t *g_request_lens;
static size_t g_nrequests;
static const char *g_expect;
static int g_shutdown = 1;
static double g_duration = 5.0;
static long g_count = 1000000;
static struct timeval g_timeout = {5, 0};
static int g_newline;
static double g_deadline;

static _Atomic long g_next;   /* next query slot to claim */
static _Atomic long g_errors;
static _Atomic long g_mismatches;
static _Atomic int g_have_first;
static char g_first_problem[256];
static uint32_t *g_latency_us; /* one slot per claimed query; UINT32_MAX marks an error */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void note_problem(const char *what, const char *detail) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&g_have_first, &expected, 1))
        snprintf(g_first_problem, sizeof g_first_problem, "%s: %.200s", what, detail);
}

/* One Exim-style query. Returns 0 on success, -1 on an I/O error, 1 on a wrong answer. */
static int query(const char *req, size_t req_len) {
    char answer[MAX_ANSWER + 1];
    size_t got = 0;
    int fd = socket(g_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { note_problem("socket", strerror(errno)); return -1; }
    /* Like Exim's ALARM(timeout): a server that never answers cannot hang the run. */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &g_timeout, sizeof g_timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &g_timeout, sizeof g_timeout);
    if (g_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0) {
        note_problem("connect", strerror(errno));
        close(fd);
        return -1;
    }
    if (req_len > 0 && write(fd, req, req_len) != (ssize_t)req_len) {
        note_problem("write", strerror(errno));
        close(fd);
        return -1;
    }
    if (g_shutdown) shutdown(fd, SHUT_WR);
    for (;;) {
        ssize_t n = read(fd, answer + got, MAX_ANSWER - got);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EINTR) continue;
            note_problem("read", errno == EAGAIN ? "timed out" : strerror(errno));
            close(fd);
            return -1;
        }
        got += (size_t)n;
        if (got == MAX_ANSWER) break;
    }
    close(fd);
    answer[got] = '\0';
    if (g_expect && strcmp(answer, g_expect) != 0) {
        note_problem("unexpected answer", answer);
        return 1;
    }
    return 0;
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        long slot = atomic_fetch_add(&g_next, 1);
        if (slot >= g_count) break;
        double t0 = now();
        if (t0 >= g_deadline) { g_latency_us[slot] = UINT32_MAX - 1; break; } /* unused slot */
        size_t r = (size_t)slot % g_nrequests;
        int rc = query(g_requests[r], g_request_lens[r]);
        double us = (now() - t0) * 1e6;
        if (rc < 0) atomic_fetch_add(&g_errors, 1);
        if (rc > 0) atomic_fetch_add(&g_mismatches, 1);
        g_latency_us[slot] = rc ? UINT32_MAX : (uint32_t)(us < 4e9 ? us : 4e9);
    }
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct(const uint32_t *sorted, long n, double p) {
    if (n == 0) return 0.0;
    long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return sorted[i];
}

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20 || c >= 0x7f) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void load_requests_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); exit(2); }
    size_t cap = 16;
    g_requests = malloc(cap * sizeof *g_requests);
    g_request_lens = malloc(cap * sizeof *g_request_lens);
    char *line = NULL;
    size_t linecap = 0;
    ssize_t len;
    while ((len = getline(&line, &linecap, f)) > 0) {
        if (line[len - 1] == '\n') line[--len] = '\0';
        if (g_nrequests == cap) {
            cap *= 2;
            g_requests = realloc(g_requests, cap * sizeof *g_requests);
            g_request_lens = realloc(g_request_lens, cap * sizeof *g_request_lens);
        }
        char *req = malloc((size_t)len + 2);
        memcpy(req, line, (size_t)len);
        if (g_newline) req[len++] = '\n';
        req[len] = '\0';
        g_requests[g_nrequests] = req;
        g_request_lens[g_nrequests++] = (size_t)len;
    }
    free(line);
    fclose(f);
    if (g_nrequests == 0) { fprintf(stderr, "%s: no requests\n", path); exit(2); }
}

static void set_address(const char *unix_path, const char *tcp) {
    memset(&g_addr, 0, sizeof g_addr);
    if (unix_path) {
        struct sockaddr_un *un = (struct sockaddr_un *)&g_addr;
        if (strlen(unix_path) >= sizeof un->sun_path) { fprintf(stderr, "path too long\n"); exit(2); }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, unix_path);
        g_family = AF_UNIX;
        g_addrlen = sizeof *un;
        return;
    }
    char host[256];
    const char *colon = strrchr(tcp, ':');
    if (!colon || (size_t)(colon - tcp) >= sizeof host) { fprintf(stderr, "bad --tcp\n"); exit(2); }
    memcpy(host, tcp, (size_t)(colon - tcp));
    host[colon - tcp] = '\0';
    int port = atoi(colon + 1);
    struct sockaddr_in *in4 = (struct sockaddr_in *)&g_addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&g_addr;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = g_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        g_addrlen = sizeof *in4;
    } else if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = g_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        g_addrlen = sizeof *in6;
    } else {
        fprintf(stderr, "bad --tcp address %s\n", host);
        exit(2);
    }
}

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"unix", required_argument, 0, 'u'},     {"tcp", required_argument, 0, 't'},
        {"threads", required_argument, 0, 'n'},  {"duration", required_argument, 0, 'd'},
        {"count", required_argument, 0, 'c'},    {"expect", required_argument, 0, 'e'},
        {"no-shutdown", no_argument, 0, 's'},    {"requests-file", required_argument, 0, 'f'},
        {"timeout", required_argument, 0, 'T'},  {"newline", no_argument, 0, 'l'},
        {0, 0, 0, 0}};
    const char *unix_path = NULL, *tcp = NULL, *requests_file = NULL;
    int threads = 1, c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'u': unix_path = optarg; break;
        case 't': tcp = optarg; break;
        case 'n': threads = atoi(optarg); break;
        case 'd': g_duration = atof(optarg); break;
        case 'c': g_count = atol(optarg); break;
        case 'e': g_expect = optarg; break;
        case 's': g_shutdown = 0; break;
        case 'f': requests_file = optarg; break;
        case 'T': {
            double t = atof(optarg);
            g_timeout.tv_sec = (time_t)t;
            g_timeout.tv_usec = (suseconds_t)((t - (double)(time_t)t) * 1e6);
            break;
        }
        case 'l': g_newline = 1; break;
        default: return 2;
        }
    }
    if (!unix_path == !tcp || threads < 1 || g_count < 1 || g_duration <= 0
        || (g_timeout.tv_sec == 0 && g_timeout.tv_usec == 0)) {
        fprintf(stderr, "usage: %s (--unix PATH | --tcp HOST:PORT) [--threads N] [--duration S]"
                        " [--count N] [--timeout S] [--expect A] [--no-shutdown] [--newline]"
                        " [--requests-file F] [REQUEST]\n",
                argv[0]);
        return 2;
    }
    set_address(unix_path, tcp);
    if (requests_file) {
        load_requests_file(requests_file);
    } else {
        static char *one[1];
        static size_t one_len[1];
        const char *req = optind < argc ? argv[optind] : "ping";
        size_t len = strlen(req);
        one[0] = malloc(len + 2);
        memcpy(one[0], req, len);
        if (g_newline) one[0][len++] = '\n';
        one[0][len] = '\0';
        one_len[0] = len;
        g_requests = one;
        g_request_lens = one_len;
        g_nrequests = 1;
    }
    signal(SIGPIPE, SIG_IGN);
    g_latency_us = malloc((size_t)g_count * sizeof *g_latency_us);
    if (!g_latency_us) { perror("malloc"); return 1; }

    pthread_t *tids = malloc((size_t)threads * sizeof *tids);
    double start = now();
    g_deadline = start + g_duration;
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    double elapsed = now() - start;

    /* Keep the successful latencies; errors and unused slots are not latencies. */
    long claimed = atomic_load(&g_next);
    if (claimed > g_count) claimed = g_count;
    long ok = 0, attempted = 0;
    for (long i = 0; i < claimed; i++) {
        uint32_t v = g_latency_us[i];
        if (v == UINT32_MAX - 1) continue;
        attempted++;
        if (v != UINT32_MAX) g_latency_us[ok++] = v;
    }
    qsort(g_latency_us, (size_t)ok, sizeof *g_latency_us, cmp_u32);
    double sum = 0;
    for (long i = 0; i < ok; i++) sum += g_latency_us[i];

    printf("{\"threads\": %d, \"queries\": %ld, \"ok\": %ld, \"errors\": %ld, \"mismatches\": %ld,"
           " \"elapsed_s\": %.6f, \"qps\": %.1f, \"mean_us\": %.1f, \"p50_us\": %.1f,"
           " \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f,"
           " \"first_problem\": ",
           threads, attempted, ok, (long)g_errors, (long)g_mismatches, elapsed,
           (double)ok / elapsed, ok ? sum / (double)ok : 0.0, pct(g_latency_us, ok, 50),
           pct(g_latency_us, ok, 90), pct(g_latency_us, ok, 99), pct(g_latency_us, ok, 99.9),
           ok ? (double)g_latency_us[ok - 1] : 0.0);
    if (atomic_load(&g_have_first)) json_string(g_first_problem);
    else printf("null");
    printf("}\n");
    return 0;
}
