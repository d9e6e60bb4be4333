/*
 * loadgen: a small epoll TCP load generator for line protocols (preforkd benchmarks).
 *
 * One thread, one epoll set, non-blocking sockets; every reply is checked byte for byte.
 *
 *   short       connect, send the payload, read the whole expected reply, close; repeat.
 *               Latency: connect() call -> last reply byte.
 *   persistent  C connections, each with exactly one request in flight; request/reply
 *               repeated on the same connection. Latency: send -> last reply byte.
 *   hold        C connections that each send the payload once, read the reply, and then
 *               stay open and silent (idle connections the server must hold).
 *   silent      C connections that connect and never send anything.
 *   trickle     C connections that send one byte ('x') every -i ms and never a line end.
 *
 * The three holding modes open their connections at most -R at a time (0: all at once),
 * print one line {"event": "ready", ...} on stdout once every connection is open (hold:
 * has its reply), then hold them until -d runs out or SIGTERM and report. A held
 * connection that the server closes is counted (closed) and not reopened.
 *
 * Per-connection latency (first_*): connect() call -> first whole reply (persistent,
 * hold) or -> connection established (silent, trickle), once per connection.
 *
 * Counts: ok, refused (ECONNREFUSED), reset (ECONNRESET / EPIPE / EOF before the whole
 * reply), wrong (reply bytes differ from the expected reply, or extra bytes), timeout
 * (a request older than -T ms, when set), other (any other errno, e.g. EADDRNOTAVAIL).
 * In persistent mode also: starved = connections (slots) that got no reply at all.
 * Descriptors: the soft RLIMIT_NOFILE is raised to the hard limit; -S N binds each
 * connection to one of the source addresses 127.0.0.1 .. 127.0.0.N in turn (loopback
 * only), so that tens of thousands of connections do not run out of ephemeral ports.
 *
 * It runs for -d seconds, or until SIGTERM/SIGINT, and then reports.
 * Output: one JSON object on stdout.
 *
 * Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { ST_IDLE = 0, ST_CONNECTING, ST_SENDING, ST_READING, ST_DELAY, ST_HELD, ST_DONE };
enum { M_SHORT = 0, M_PERSISTENT, M_HOLD, M_SILENT, M_TRICKLE };

typedef struct {
    int fd;
    int state;
    size_t sent;        /* bytes of the payload sent */
    size_t got;         /* bytes of the reply received */
    uint64_t t_start;   /* ns: connect (short) or send (persistent) */
    uint64_t t_conn;    /* ns: this connection's connect() call */
    uint64_t resume_at; /* ns: when a delayed slot may start again; trickle: next byte */
    uint64_t replies;   /* ok replies on this slot (persistent: starvation) */
    uint32_t events;    /* epoll events currently registered */
    int opened;         /* holding modes: this slot has been open (and answered) once */
} slot_t;

static int g_mode = M_SHORT;
static int g_persistent = 0; /* the connection stays open after a reply (persistent, hold) */
static int g_holding = 0;    /* hold, silent, trickle */
static struct sockaddr_in g_addr;
static char *g_payload;
static size_t g_payload_len;
static char *g_expect;
static size_t g_expect_len;
static int g_epfd;
static slot_t *g_slots;
static int g_conc = 4;
static int g_nsrc = 1;      /* source addresses 127.0.0.1 .. 127.0.0.N (short mode) */
static unsigned g_src_next = 0;
static uint64_t g_timeout_ns = 0;
static uint64_t g_retry_ns = 1000000; /* 1 ms back-off after an error */
static uint64_t g_trickle_ns = 100000000; /* trickle: one byte every -i ms */
static int g_ramp = 0;      /* holding modes: at most this many connections opening at once */
static int g_next_start = 0; /* holding modes: slots below this one have been started */
static int g_opening = 0;   /* holding modes: started, not yet open */
static int g_opened = 0;    /* holding modes: slots open (answered) at least once */
static int g_ready_said = 0;
static uint64_t c_closed, c_unsolicited;
static uint64_t *g_first;   /* per-connection latency to the first reply / to connected */
static size_t g_nfirst;

static uint64_t c_ok, c_refused, c_reset, c_wrong, c_timeout, c_other, c_connects;
static uint64_t *g_lat;     /* latency samples, ns */
static size_t g_nlat, g_caplat;
static int g_delayed = 0;   /* slots in ST_DELAY */
static volatile sig_atomic_t g_stop = 0; /* SIGTERM/SIGINT: stop early, still report */

static void on_stop(int sig) { (void)sig; g_stop = 1; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void record(uint64_t ns) {
    if (g_nlat == g_caplat) {
        size_t cap = g_caplat ? g_caplat * 2 : 1 << 16;
        uint64_t *p = realloc(g_lat, cap * sizeof *p);
        if (!p) return; /* out of memory: stop recording, keep counting */
        g_lat = p;
        g_caplat = cap;
    }
    g_lat[g_nlat++] = ns;
}

static void record_first(slot_t *s, uint64_t t) {
    if (g_nfirst < (size_t)g_conc) g_first[g_nfirst++] = t - s->t_conn;
}

static void ep_set(slot_t *s, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.ptr = s};
    if (s->events == 0) {
        if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, s->fd, &e) == 0) s->events = ev;
    } else if (s->events != ev) {
        if (epoll_ctl(g_epfd, EPOLL_CTL_MOD, s->fd, &e) == 0) s->events = ev;
    }
}

static void close_slot(slot_t *s) {
    if (s->fd >= 0) close(s->fd); /* close() also drops it from the epoll set */
    s->fd = -1;
    s->events = 0;
    s->state = ST_IDLE;
}

static void count_errno(int err) {
    switch (err) {
    case ECONNREFUSED: c_refused++; break;
    case ECONNRESET: case EPIPE: case ECONNABORTED: c_reset++; break;
    case ETIMEDOUT: c_timeout++; break;
    default: c_other++; break;
    }
}

/* An error on a slot: count it, close, and retry after a short back-off. */
static void fail_slot(slot_t *s, int err) {
    if (err) count_errno(err);
    close_slot(s);
    s->state = ST_DELAY;
    s->resume_at = now_ns() + g_retry_ns;
    g_delayed++;
}

static void try_send(slot_t *s);

static void start_conn(slot_t *s) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { fail_slot(s, errno); return; }
    s->fd = fd;
    s->events = 0;
    s->sent = s->got = 0;
    if (g_mode != M_SHORT) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (g_nsrc > 1) {
        int one = 1;
        struct sockaddr_in src = {.sin_family = AF_INET};
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        src.sin_addr.s_addr = htonl(0x7f000001u + (g_src_next++ % (unsigned)g_nsrc));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { fail_slot(s, errno); return; }
    }
    s->t_start = now_ns();
    if (!s->t_conn) s->t_conn = s->t_start; /* a slot's first connect() counts */
    c_connects++;
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr) < 0 && errno != EINPROGRESS) {
        fail_slot(s, errno);
        return;
    }
    /* On loopback the handshake has usually completed already: try to send at once. */
    s->state = ST_CONNECTING;
    if (g_mode == M_SILENT || g_mode == M_TRICKLE) {
        ep_set(s, EPOLLOUT); /* nothing to send: wait until established */
        return;
    }
    try_send(s);
}

/* Holding modes: the connection is open (hold: and answered). */
static void become_held(slot_t *s, uint64_t t) {
    s->state = ST_HELD;
    ep_set(s, EPOLLIN | EPOLLRDHUP); /* to see the server close it */
    if (g_mode == M_TRICKLE) /* spread the bytes over the interval */
        s->resume_at = t + (uint64_t)(s - g_slots) * 7919u * 1000003u % (g_trickle_ns ? g_trickle_ns : 1);
    if (!s->opened) {
        s->opened = 1;
        record_first(s, t);
        g_opening--;
        g_opened++;
    }
}

/* Silent and trickle connections: established (or failed). */
static void on_connected(slot_t *s) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        fail_slot(s, err);
        return;
    }
    c_ok++;
    become_held(s, now_ns());
}

/* A held connection: the server sent something (counted) or closed it. */
static void on_held_readable(slot_t *s) {
    char buf[4096];
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) { c_unsolicited += (uint64_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        c_closed++; /* EOF or reset: not reopened */
        close_slot(s);
        s->state = ST_DONE;
        return;
    }
}

static void trickle_byte(slot_t *s, uint64_t t) {
    s->resume_at = t + g_trickle_ns;
    ssize_t n = send(s->fd, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
        c_closed++;
        close_slot(s);
        s->state = ST_DONE;
    }
}

static void try_send(slot_t *s) {
    for (;;) {
        ssize_t n = send(s->fd, g_payload + s->sent, g_payload_len - s->sent,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            s->sent += (size_t)n;
            if (s->sent == g_payload_len) {
                s->state = ST_READING;
                ep_set(s, EPOLLIN);
                return;
            }
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == ENOTCONN || errno == EINPROGRESS)) {
            /* not connected yet, or buffer full: wait for writability */
            if (s->state != ST_CONNECTING) s->state = ST_SENDING;
            ep_set(s, EPOLLOUT);
            return;
        }
        if (s->state == ST_CONNECTING) {
            /* connect failed: the real reason is in SO_ERROR */
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err == 0) err = errno;
            fail_slot(s, err);
        } else {
            fail_slot(s, errno);
        }
        return;
    }
}

static void begin_request(slot_t *s) {
    /* persistent: next request on the same connection */
    s->sent = s->got = 0;
    s->t_start = now_ns();
    s->state = ST_SENDING;
    try_send(s);
}

static void on_readable(slot_t *s) {
    char buf[4096];
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) {
            size_t k = (size_t)n;
            if (s->got + k > g_expect_len || memcmp(buf, g_expect + s->got, k) != 0) {
                c_wrong++;
                fail_slot(s, 0);
                return;
            }
            s->got += k;
            if (s->got == g_expect_len) {
                uint64_t t = now_ns();
                c_ok++;
                if (!s->replies && g_mode == M_PERSISTENT) record_first(s, t);
                s->replies++;
                record(t - s->t_start);
                if (g_holding) {
                    become_held(s, t);
                } else if (g_persistent) {
                    begin_request(s);
                } else {
                    close_slot(s);
                    start_conn(s);
                }
                return;
            }
            continue; /* partial reply: read more */
        }
        if (n == 0) { /* EOF before the whole reply */
            c_reset++;
            fail_slot(s, 0);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        fail_slot(s, errno);
        return;
    }
}

static void on_event(slot_t *s, uint32_t ev) {
    if (s->fd < 0) return;
    if (s->state == ST_HELD) {
        on_held_readable(s);
        return;
    }
    if (s->state == ST_CONNECTING && (g_mode == M_SILENT || g_mode == M_TRICKLE)) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(s);
        return;
    }
    if (s->state == ST_CONNECTING || s->state == ST_SENDING) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) try_send(s);
        return;
    }
    if (s->state == ST_READING) {
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) on_readable(s);
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_of(const uint64_t *xs, size_t n, double p) {
    if (n == 0) return 0.0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    if (i >= n) i = n - 1;
    return (double)xs[i] / 1000.0;
}

static double pct(double p) { return pct_of(g_lat, g_nlat, p); }

static const char *mode_name(void) {
    static const char *names[] = {"short", "persistent", "hold", "silent", "trickle"};
    return names[g_mode];
}

/* Holding modes: start connections while fewer than -R are opening. */
static void ramp(void) {
    while (g_next_start < g_conc && (g_ramp <= 0 || g_opening < g_ramp)) {
        slot_t *s = &g_slots[g_next_start++];
        g_opening++;
        start_conn(s);
    }
}

static void say_ready(uint64_t t0) {
    if (g_ready_said || g_opened < g_conc) return;
    g_ready_said = 1;
    uint64_t *f = malloc(g_nfirst * sizeof *f + 1);
    if (f) {
        memcpy(f, g_first, g_nfirst * sizeof *f);
        qsort(f, g_nfirst, sizeof *f, cmp_u64);
    }
    printf("{\"event\": \"ready\", \"opened\": %d, \"elapsed_s\": %.6f, \"first_min_us\": %.1f, "
           "\"first_p50_us\": %.1f, \"first_max_us\": %.1f, \"errors\": %llu}\n",
           g_opened, (double)(now_ns() - t0) / 1e9, f && g_nfirst ? (double)f[0] / 1000.0 : 0.0,
           f ? pct_of(f, g_nfirst, 0.5) : 0.0,
           f && g_nfirst ? (double)f[g_nfirst - 1] / 1000.0 : 0.0,
           (unsigned long long)(c_refused + c_reset + c_wrong + c_timeout + c_other));
    fflush(stdout);
    free(f);
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [-m short|persistent|hold|silent|trickle] [-H host] [-p port] [-c concurrency]\n"
            "          [-d seconds] [-P payload] [-E expected-reply] [-T timeout-ms] [-S n-source-addrs]\n"
            "          [-i trickle-interval-ms] [-R max-opening-at-once]\n"
            "  payload and reply accept \\r \\n \\t \\\\ \\xHH escapes; defaults 'PING\\r\\n' and '+PONG\\r\\n'\n",
            argv0);
    exit(2);
}

static char *unescape(const char *in, size_t *len) {
    size_t n = strlen(in), j = 0;
    char *out = malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        if (in[i] == '\\' && i + 3 < n && in[i + 1] == 'x' && isxdigit((unsigned char)in[i + 2])
            && isxdigit((unsigned char)in[i + 3])) {  /* \xHH: any byte (a binary PROXY v2 header) */
            char hex[3] = {in[i + 2], in[i + 3], 0};
            out[j++] = (char)strtol(hex, NULL, 16);
            i += 3;
        } else if (in[i] == '\\' && i + 1 < n) {
            char c = in[++i];
            out[j++] = c == 'r' ? '\r' : c == 'n' ? '\n' : c == 't' ? '\t' : c;
        } else {
            out[j++] = in[i];
        }
    }
    out[j] = 0;
    *len = j;
    return out;
}

static void json_str(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\r') printf("\\r");
        else if (c == '\n') printf("\\n");
        else if (c < 0x20 || c >= 0x7f) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 7000;
    double duration = 3.0;
    const char *payload = "PING\\r\\n", *expect = "+PONG\\r\\n";
    int opt;
    while ((opt = getopt(argc, argv, "m:H:p:c:d:P:E:T:S:i:R:h")) != -1) {
        switch (opt) {
        case 'm':
            if (!strcmp(optarg, "short")) g_mode = M_SHORT;
            else if (!strcmp(optarg, "persistent")) g_mode = M_PERSISTENT;
            else if (!strcmp(optarg, "hold")) g_mode = M_HOLD;
            else if (!strcmp(optarg, "silent")) g_mode = M_SILENT;
            else if (!strcmp(optarg, "trickle")) g_mode = M_TRICKLE;
            else usage(argv[0]);
            break;
        case 'i': g_trickle_ns = (uint64_t)(atof(optarg) * 1e6); break;
        case 'R': g_ramp = atoi(optarg); break;
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': g_conc = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'P': payload = optarg; break;
        case 'E': expect = optarg; break;
        case 'T': g_timeout_ns = (uint64_t)(atof(optarg) * 1e6); break;
        case 'S': g_nsrc = atoi(optarg); break;
        default: usage(argv[0]);
        }
    }
    if (g_conc < 1 || g_conc > 100000 || port <= 0 || port > 65535 || duration <= 0 ||
        duration > 3600 || g_nsrc < 1 || g_nsrc > 250 || g_trickle_ns < 1000000 || g_ramp < 0)
        usage(argv[0]);
    g_persistent = g_mode != M_SHORT;
    g_holding = g_mode >= M_HOLD;
    g_payload = unescape(payload, &g_payload_len);
    g_expect = unescape(expect, &g_expect_len);
    if (g_payload_len == 0 || g_expect_len == 0) usage(argv[0]);
    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", host);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g_epfd < 0) { perror("epoll_create1"); return 1; }
    g_slots = calloc((size_t)g_conc, sizeof *g_slots);
    g_first = calloc((size_t)g_conc, sizeof *g_first);
    struct epoll_event *evs = calloc((size_t)g_conc, sizeof *evs);
    if (!g_slots || !g_first || !evs) { perror("calloc"); return 1; }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < (rlim_t)g_conc + 16)
        fprintf(stderr, "loadgen: %d connections need more descriptors than RLIMIT_NOFILE (%llu)\n",
                g_conc, (unsigned long long)rl.rlim_cur);

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t0 = now_ns();
    uint64_t t_end = t0 + (uint64_t)(duration * 1e9);

    for (int i = 0; i < g_conc; i++) g_slots[i].fd = -1;
    if (g_holding) {
        ramp();
    } else {
        for (int i = 0; i < g_conc; i++) start_conn(&g_slots[i]);
    }

    uint64_t last_sweep = t0;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= t_end || g_stop) break;
        uint64_t wait_ns = t_end - t;
        if (g_delayed && wait_ns > g_retry_ns) wait_ns = g_retry_ns;
        if (g_timeout_ns && wait_ns > 10000000ull) wait_ns = 10000000ull;
        if (g_mode == M_TRICKLE && wait_ns > 5000000ull) wait_ns = 5000000ull;
        int timeout_ms = (int)((wait_ns + 999999) / 1000000);
        int n = epoll_wait(g_epfd, evs, g_conc, timeout_ms);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); break; }
        for (int i = 0; i < n; i++) on_event((slot_t *)evs[i].data.ptr, evs[i].events);
        if (g_holding) {
            ramp();
            say_ready(t0);
            if (g_mode == M_TRICKLE) {
                t = now_ns();
                for (int i = 0; i < g_next_start; i++) {
                    slot_t *s = &g_slots[i];
                    if (s->state == ST_HELD && t >= s->resume_at) trickle_byte(s, t);
                }
            }
        }
        if (g_delayed || g_timeout_ns) {
            t = now_ns();
            if (g_delayed) {
                for (int i = 0; i < g_conc; i++) {
                    slot_t *s = &g_slots[i];
                    if (s->state == ST_DELAY && t >= s->resume_at) {
                        g_delayed--;
                        s->state = ST_IDLE;
                        start_conn(s);
                    }
                }
            }
            if (g_timeout_ns && t - last_sweep >= 10000000ull) {
                last_sweep = t;
                for (int i = 0; i < g_conc; i++) {
                    slot_t *s = &g_slots[i];
                    if (s->fd >= 0 && s->state != ST_DELAY && s->state != ST_HELD &&
                        t - s->t_start > g_timeout_ns) {
                        c_timeout++;
                        fail_slot(s, 0);
                    }
                }
            }
        }
    }
    uint64_t t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);

    int inflight = 0, starved = 0, stalled = 0, held = 0;
    uint64_t oldest = 0;
    for (int i = 0; i < g_conc; i++) {
        slot_t *s = &g_slots[i];
        if (s->state == ST_HELD) {
            held++;
            continue;
        }
        if (s->fd >= 0) {
            inflight++;
            uint64_t age = t1 - s->t_start;
            if (age > oldest) oldest = age;
            if (age > 1000000000ull) stalled++;
        }
        if (s->replies == 0) starved++;
    }
    qsort(g_lat, g_nlat, sizeof *g_lat, cmp_u64);
    qsort(g_first, g_nfirst, sizeof *g_first, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < g_nlat; i++) sum += (double)g_lat[i];
    double elapsed = (double)(t1 - t0) / 1e9;
    double cpu_user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                      (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    uint64_t errors = c_refused + c_reset + c_wrong + c_timeout + c_other;

    printf("{\"mode\": \"%s\", \"host\": \"%s\", \"port\": %d, \"concurrency\": %d, ",
           mode_name(), host, port, g_conc);
    printf("\"payload\": ");
    json_str(g_payload, g_payload_len);
    printf(", \"expect\": ");
    json_str(g_expect, g_expect_len);
    printf(", \"elapsed_s\": %.6f, \"ok\": %llu, \"rate\": %.1f, \"connects\": %llu, ", elapsed,
           (unsigned long long)c_ok, elapsed > 0 ? (double)c_ok / elapsed : 0.0,
           (unsigned long long)c_connects);
    printf("\"refused\": %llu, \"reset\": %llu, \"wrong\": %llu, \"timeout\": %llu, "
           "\"other\": %llu, \"errors\": %llu, ",
           (unsigned long long)c_refused, (unsigned long long)c_reset,
           (unsigned long long)c_wrong, (unsigned long long)c_timeout,
           (unsigned long long)c_other, (unsigned long long)errors);
    printf("\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f, ",
           pct(0.50), pct(0.90), pct(0.99), g_nlat ? (double)g_lat[g_nlat - 1] / 1000.0 : 0.0,
           g_nlat ? sum / (double)g_nlat / 1000.0 : 0.0);
    printf("\"starved\": %d, \"inflight_end\": %d, \"stalled_end\": %d, \"oldest_inflight_ms\": %.1f, ",
           g_mode == M_PERSISTENT ? starved : 0, inflight, stalled, (double)oldest / 1e6);
    printf("\"first_n\": %zu, \"first_p50_us\": %.1f, \"first_p99_us\": %.1f, \"first_max_us\": %.1f, ",
           g_nfirst, pct_of(g_first, g_nfirst, 0.5), pct_of(g_first, g_nfirst, 0.99),
           g_nfirst ? (double)g_first[g_nfirst - 1] / 1000.0 : 0.0);
    if (g_holding)
        printf("\"opened\": %d, \"held_end\": %d, \"closed\": %llu, \"unsolicited_bytes\": %llu, ",
               g_opened, held, (unsigned long long)c_closed, (unsigned long long)c_unsolicited);
    printf("\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"cpu_util\": %.4f}\n", cpu_user, cpu_sys,
           elapsed > 0 ? (cpu_user + cpu_sys) / elapsed : 0.0);
    return 0;
}
