/* Test worker: tries to replace its reuseport group's program through io_uring, past a seccomp
 * filter that refuses setsockopt(SO_ATTACH_REUSEPORT_CBPF): an IORING_OP_URING_CMD with
 * SOCKET_URING_OP_SETSOCKOPT (Linux 6.7+) makes that setsockopt inside the kernel. It attaches
 * a classic BPF `ret #0` (every connection to the group's first socket) to fd 3, prints
 * `attach-uring: ok` or `attach-uring: errno N at STEP`, and, with `--repeat`, attaches again
 * every 100 ms from a child process for as long as it runs. Then it execs argv[...] (the
 * server), which serves on fd 3.
 *
 * Built by `cargo xtask test` (gcc) into target/hardening/uring-attach. Written against the
 * raw system calls, so it needs neither liburing nor headers newer than Debian 12's. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>

#define NR_IO_URING_SETUP 425
#define NR_IO_URING_ENTER 426
#define IORING_OP_URING_CMD 46
#define SOCKET_URING_OP_SETSOCKOPT 3
#define IORING_ENTER_GETEVENTS 1u
#define IORING_OFF_SQ_RING 0ULL
#define IORING_OFF_CQ_RING 0x8000000ULL
#define IORING_OFF_SQES 0x10000000ULL
#define SO_ATTACH_REUSEPORT_CBPF 51

/* struct io_uring_params and its offsets (linux/io_uring.h), as plain words. */
struct sq_offsets { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1; uint64_t user_addr; };
struct cq_offsets { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1; uint64_t user_addr; };
struct params {
    uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
    struct sq_offsets sq_off;
    struct cq_offsets cq_off;
};
/* The 64-byte submission entry, with the fields a socket command uses. */
struct sqe {
    uint8_t opcode, flags; uint16_t ioprio; int32_t fd;
    uint32_t cmd_op, pad1;           /* union with off */
    uint32_t level, optname;         /* union with addr */
    uint32_t len, op_flags;
    uint64_t user_data;
    uint16_t buf_index, personality; uint32_t optlen;
    uint64_t optval, pad2;
};
struct cqe { uint64_t user_data; int32_t res; uint32_t flags; };

static const char *step = "";

/* One setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, `ret #0`) through a new ring:
 * 0, or the errno. */
static int attach_through_uring(int fd) {
    struct params p;
    memset(&p, 0, sizeof p);
    step = "io_uring_setup";
    int ring = (int)syscall(NR_IO_URING_SETUP, 1, &p);
    if (ring < 0) return errno;
    step = "mmap";
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct cqe);
    char *sq = mmap(0, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct sqe *sqes = mmap(0, p.sq_entries * sizeof(struct sqe), PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { int e = errno; close(ring); return e; }

    static struct sock_filter ret0 = {BPF_RET | BPF_K, 0, 0, 0};
    static struct sock_fprog program = {1, &ret0};
    struct sqe *entry = &sqes[0];
    memset(entry, 0, sizeof *entry);
    entry->opcode = IORING_OP_URING_CMD;
    entry->fd = fd;
    entry->cmd_op = SOCKET_URING_OP_SETSOCKOPT;
    entry->level = 1; /* SOL_SOCKET */
    entry->optname = SO_ATTACH_REUSEPORT_CBPF;
    entry->optlen = sizeof program;
    entry->optval = (uint64_t)(uintptr_t)&program;
    uint32_t *tail = (uint32_t *)(sq + p.sq_off.tail);
    uint32_t mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    uint32_t *array = (uint32_t *)(sq + p.sq_off.array);
    array[*tail & mask] = 0;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);

    step = "io_uring_enter";
    if (syscall(NR_IO_URING_ENTER, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        int e = errno; close(ring); return e;
    }
    step = "the command";
    uint32_t head = __atomic_load_n((uint32_t *)(cq + p.cq_off.head), __ATOMIC_ACQUIRE);
    uint32_t cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    struct cqe *done = (struct cqe *)(cq + p.cq_off.cqes) + (head & cq_mask);
    int res = done->res;
    close(ring);
    return res < 0 ? -res : 0;
}

int main(int argc, char **argv) {
    int repeat = argc > 1 && strcmp(argv[1], "--repeat") == 0;
    char **server = argv + 1 + repeat;
    if (!*server) { fprintf(stderr, "usage: uring-attach [--repeat] SERVER [ARGS...]\n"); return 2; }
    const char *id = getenv("CLUSTER_LB_WORKER_ID");
    if (id && strcmp(id, "0") == 0) {
        int error = attach_through_uring(3);
        if (error == 0) printf("attach-uring: ok\n");
        else printf("attach-uring: errno %d at %s\n", error, step);
        fflush(stdout);
        if (error == 0 && repeat && fork() == 0) {
            /* A child keeps fd 3 and attaches again every 100 ms, as an attacker would. */
            for (;;) { usleep(100000); attach_through_uring(3); }
        }
    }
    execvp(server[0], server);
    perror("exec");
    return 127;
}
