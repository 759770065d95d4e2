/*
 * apflab-memtouch — the guest workload: touch a working set so that the host,
 * which keeps the guest's RAM under a cgroup limit with swap, has to swap it in
 * again; each such guest user-mode fault on host-swapped memory is an async PF.
 *
 * Usage: apflab-memtouch --mb N --procs P --rounds R [--pattern seq|random|bursty]
 *                        [--pause-ms MS] [--seed S]
 *
 * Each of P processes maps N MiB of private anonymous memory, fills it (round 0),
 * then touches every page (read-modify-write) R more times in the given order:
 *   seq     pages in address order
 *   random  a random permutation of the pages
 *   bursty  runs of 64 consecutive pages starting at random pages, back to back
 * and sleeps MS milliseconds between rounds, giving the host time to swap the
 * set out again.  For every (process, round) it prints one JSON line:
 *   {"proc":0,"round":1,"pages":15360,"seconds":1.234,"max_touch_us":5123,
 *    "slow_touches":812,"start_ms":8123.4,"hist_log2_us":[...],
 *    "stalls":[[t_ms,us],...],"stalls_dropped":0}
 * where a slow touch took more than 100 us (a fault that had to wait);
 * start_ms is the round's start on the program's clock (ms since it started);
 * hist_log2_us[b] counts touches of [2^b, 2^(b+1)) us (b = 0: under 2 us; the
 * last bucket everything longer); stalls lists every touch of 1 ms or more as
 * [start ms on the program's clock, us] (the first MAX_STALLS of each round).
 * Exit status: 0 when every process finished every round, 1 otherwise,
 * 2 on bad arguments.
 *
 * Built statically on the host (gcc -static -O2) into the guest image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define BURST 64UL
#define SLOW_NS 100000ULL
#define STALL_NS 1000000ULL
#define HIST_BUCKETS 25
#define MAX_STALLS 1000

struct round_stats {
	uint64_t max_ns;
	size_t slow;
	size_t hist[HIST_BUCKETS];
	size_t nstalls, stalls_dropped;
	uint64_t stall_at_ns[MAX_STALLS], stall_ns[MAX_STALLS];
};

static uint64_t prog_start_ns;

enum pattern { SEQ, RANDOM, BURSTY };

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state;
static uint64_t rng(void) /* xorshift64* */
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static void build_order(size_t *order, size_t n, enum pattern p)
{
	size_t i, k = 0;
	switch (p) {
	case SEQ:
		for (i = 0; i < n; i++)
			order[i] = i;
		break;
	case RANDOM:
		for (i = 0; i < n; i++)
			order[i] = i;
		for (i = n - 1; i > 0; i--) {
			size_t j = rng() % (i + 1), t = order[i];
			order[i] = order[j];
			order[j] = t;
		}
		break;
	case BURSTY:
		while (k < n) {
			size_t start = rng() % n;
			for (i = 0; i < BURST && k < n; i++)
				order[k++] = (start + i) % n;
		}
		break;
	}
}

static void account(struct round_stats *st, uint64_t at, uint64_t dt)
{
	uint64_t us = dt / 1000;
	int b = 0;

	if (dt > st->max_ns)
		st->max_ns = dt;
	if (dt > SLOW_NS)
		st->slow++;
	while (b < HIST_BUCKETS - 1 && us >= (2ULL << b))
		b++;
	st->hist[b]++;
	if (dt >= STALL_NS) {
		if (st->nstalls < MAX_STALLS) {
			st->stall_at_ns[st->nstalls] = at - prog_start_ns;
			st->stall_ns[st->nstalls++] = dt;
		} else {
			st->stalls_dropped++;
		}
	}
}

static void report(int proc, int round, size_t pages, uint64_t t0, uint64_t ns,
		   const struct round_stats *st)
{
	size_t i;

	printf("{\"proc\":%d,\"round\":%d,\"pages\":%zu,\"seconds\":%.6f,"
	       "\"max_touch_us\":%llu,\"slow_touches\":%zu,\"start_ms\":%.3f,"
	       "\"hist_log2_us\":[",
	       proc, round, pages, ns / 1e9, (unsigned long long)(st->max_ns / 1000), st->slow,
	       (t0 - prog_start_ns) / 1e6);
	for (i = 0; i < HIST_BUCKETS; i++)
		printf("%s%zu", i ? "," : "", st->hist[i]);
	printf("],\"stalls\":[");
	for (i = 0; i < st->nstalls; i++)
		printf("%s[%.3f,%llu]", i ? "," : "", st->stall_at_ns[i] / 1e6,
		       (unsigned long long)(st->stall_ns[i] / 1000));
	printf("],\"stalls_dropped\":%zu}\n", st->stalls_dropped);
	fflush(stdout);
}

static int worker(int proc, size_t mb, int rounds, enum pattern p, int pause_ms)
{
	size_t n = mb * 1024 * 1024 / PAGE, i;
	volatile unsigned char *buf;
	size_t *order;
	uint64_t t0, t;
	struct round_stats *st = malloc(sizeof(*st));
	int r;

	buf = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	order = malloc(n * sizeof(*order));
	if (buf == MAP_FAILED || !order || !st) {
		fprintf(stderr, "apflab-memtouch: proc %d: out of memory: %s\n", proc,
			strerror(errno));
		return 1;
	}
	for (r = 0; r <= rounds; r++) {
		if (r == 0)
			build_order(order, n, SEQ);
		else
			build_order(order, n, p);
		memset(st, 0, sizeof(*st));
		t0 = now_ns();
		for (i = 0; i < n; i++) {
			t = now_ns();
			buf[order[i] * PAGE] += 1;
			account(st, t, now_ns() - t);
		}
		report(proc, r, n, t0, now_ns() - t0, st);
		if (r < rounds && pause_ms > 0)
			usleep((useconds_t)pause_ms * 1000);
	}
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: apflab-memtouch --mb N --procs P --rounds R "
			"[--pattern seq|random|bursty] [--pause-ms MS] [--seed S]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "mb", required_argument, 0, 'm' },	  { "procs", required_argument, 0, 'p' },
		{ "rounds", required_argument, 0, 'r' },  { "pattern", required_argument, 0, 't' },
		{ "pause-ms", required_argument, 0, 's' }, { "seed", required_argument, 0, 'S' },
		{ 0, 0, 0, 0 }
	};
	long mb = 0, procs = 0, rounds = 0, pause_ms = 1000, seed = 1;
	enum pattern p = SEQ;
	int c, i, status, failed = 0;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'm': mb = atol(optarg); break;
		case 'p': procs = atol(optarg); break;
		case 'r': rounds = atol(optarg); break;
		case 's': pause_ms = atol(optarg); break;
		case 'S': seed = atol(optarg); break;
		case 't':
			if (!strcmp(optarg, "seq")) p = SEQ;
			else if (!strcmp(optarg, "random")) p = RANDOM;
			else if (!strcmp(optarg, "bursty")) p = BURSTY;
			else usage();
			break;
		default: usage();
		}
	}
	if (mb <= 0 || procs <= 0 || procs > 256 || rounds < 0 || pause_ms < 0)
		usage();
	setvbuf(stdout, NULL, _IOLBF, 0);
	prog_start_ns = now_ns();
	for (i = 0; i < procs; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("apflab-memtouch: fork");
			return 1;
		}
		if (pid == 0) {
			rng_state = (uint64_t)seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i + 1;
			_exit(worker(i, (size_t)mb, (int)rounds, p, (int)pause_ms));
		}
	}
	while (wait(&status) > 0)
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed = 1;
	return failed;
}
