/* pktecho.c - the NIC benchmark's limits: raw frame ping-pong without iopart.
 *
 *   pktecho echo IFNAME|tap:NAME [CPU]   send every 0x88b5 frame back to its sender
 *   pktecho ping IFNAME DSTMAC LEN N [CPU]
 *       N round trips of LEN-byte frames to DSTMAC; prints one JSON line with the
 *       latencies' p50/p99/p99.9 (ns) and the count.
 *
 * Interfaces are used through AF_PACKET sockets that ignore their own transmissions;
 * tap:NAME opens (or creates) a TAP and echoes on its fd. Blocking I/O: this is what a
 * frame costs through the kernel with no polling on either side.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/ethernet.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif
#define ETYPE 0x88b5

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void pin(const char *cpu)
{
    if (!cpu)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(atoi(cpu), &s);
    sched_setaffinity(0, sizeof s, &s);
}

static int open_if(const char *name, uint8_t *mac)
{
    if (!strncmp(name, "tap:", 4)) {
        int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
        strncpy(ifr.ifr_name, name + 4, IFNAMSIZ - 1);
        if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0) {
            perror("tap");
            exit(2);
        }
        if (mac)
            memset(mac, 0, 6);
        return fd;
    }
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    int one = 1;
    setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (s < 0 || ioctl(s, SIOCGIFINDEX, &ifr) < 0) {
        perror(name);
        exit(2);
    }
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = ifr.ifr_ifindex};
    if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("bind");
        exit(2);
    }
    if (mac) {
        ioctl(s, SIOCGIFHWADDR, &ifr);
        memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    }
    return s;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    uint8_t f[2048], mac[6];
    if (argc >= 3 && !strcmp(argv[1], "echo")) {
        pin(argc > 3 ? argv[3] : NULL);
        int fd = open_if(argv[2], mac);
        printf("{\"ready\": true}\n");
        fflush(stdout);
        for (;;) {
            ssize_t n = read(fd, f, sizeof f);
            if (n < 14 || ((f[12] << 8) | f[13]) != ETYPE)
                continue;
            uint8_t tmp[6];
            memcpy(tmp, f, 6);
            memcpy(f, f + 6, 6);
            memcpy(f + 6, tmp, 6);
            if (write(fd, f, (size_t)n) != n)
                continue;
        }
    }
    if (argc >= 6 && !strcmp(argv[1], "ping")) {
        pin(argc > 6 ? argv[6] : NULL);
        int fd = open_if(argv[2], mac);
        uint8_t dst[6];
        unsigned v[6];
        if (sscanf(argv[3], "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
            return 2;
        for (int i = 0; i < 6; i++)
            dst[i] = (uint8_t)v[i];
        uint32_t len = (uint32_t)atoi(argv[4]);
        uint64_t n = strtoull(argv[5], NULL, 10);
        if (len < 60 || len > sizeof f || !n)
            return 2;
        uint64_t *lat = calloc(n, sizeof *lat);
        struct timeval tv = {2, 0}; /* a lost frame ends the run instead of hanging it */
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        memcpy(f, dst, 6);
        memcpy(f + 6, mac, 6);
        f[12] = ETYPE >> 8;
        f[13] = ETYPE & 0xff;
        memset(f + 14, 0x5a, len - 14);
        uint8_t r[2048];
        for (uint64_t k = 0; k < n; k++) {
            memcpy(f + 14, &k, sizeof k);
            uint64_t t0 = now_ns();
            if (write(fd, f, len) != (ssize_t)len) {
                perror("write");
                return 1;
            }
            for (;;) {
                ssize_t got = read(fd, r, sizeof r);
                if (got < 0) {
                    fprintf(stderr, "frame %llu: %s\n", (unsigned long long)k, strerror(errno));
                    return 1;
                }
                uint64_t seq;
                memcpy(&seq, r + 14, sizeof seq);
                if (got >= 22 && ((r[12] << 8) | r[13]) == ETYPE && seq == k)
                    break;
            }
            lat[k] = now_ns() - t0;
        }
        qsort(lat, n, sizeof *lat, cmp);
        double sum = 0;
        for (uint64_t k = 0; k < n; k++)
            sum += (double)lat[k];
        printf("{\"n\": %llu, \"p50_ns\": %llu, \"p99_ns\": %llu, \"p999_ns\": %llu, "
               "\"mean_ns\": %.1f}\n",
               (unsigned long long)n, (unsigned long long)lat[n / 2],
               (unsigned long long)lat[n * 99 / 100], (unsigned long long)lat[n * 999 / 1000],
               sum / (double)n);
        return 0;
    }
    fprintf(stderr, "usage: pktecho echo IFNAME|tap:NAME [CPU] | "
                    "pktecho ping IFNAME DSTMAC LEN N [CPU]\n");
    return 2;
}
