// The host CUDA emulator's runtime (docs: emulator.md §1 "Runtime", §5): kernel registry, fiber
// scheduler, worker threads and the C ABI that src/backend/emu.rs calls.
//
// Each OS thread that runs blocks owns a BlockRun: one fiber per CUDA thread of the block, each
// with its own mmap'd stack (guard page below), plus the warp exchange buffers and the dynamic
// shared memory. Fibers switch only at barriers, warp collectives and exit; the scheduler makes
// passes over the fibers in forward, reverse or (seeded) random order and releases a barrier once
// every thread it waits for has arrived. A pass that runs nothing and releases nothing is a
// deadlock, reported as an error instead of a hang.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdarg>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

extern "C" {
// Launch options (mirrored by `EmuOptionsFfi` in src/backend/emu.rs).
struct EmuOptions {
    int32_t schedule;  // 0 forward, 1 reverse, 2 random
    int32_t poison;    // non-zero: fill dynamic shared memory with 0xff at every block start
    uint32_t workers;  // OS threads that run blocks (>= 1)
    uint32_t reserved;
    uint64_t seed;  // random schedule seed
};
}

namespace emu {
namespace {

enum : int { kOk = 0, kUnknownKernel = 1, kDeadlock = 2, kKernelFailed = 3, kInvalidConfig = 4, kDuplicate = 5 };
enum : uint8_t { kReady, kWaitBlock, kWaitWarp, kDone, kFailed };
constexpr unsigned kSlot = 64;                 // bytes per lane in a warp exchange
constexpr unsigned kMaxSharedDyn = 232448;     // 227 KiB, the sm_90 opt-in maximum
constexpr size_t kXbufBytes = 32 * 2 * 32 * kSlot;

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------
struct Entry {
    const KernelInfo* info = nullptr;
    std::vector<std::string> sites;  // file:line of every registration
};
struct Registry {
    std::mutex m;
    std::map<std::string, Entry> map;
};
Registry& registry() {
    static Registry* r = new Registry;  // never destroyed: launches may run during exit
    return *r;
}

// ---------------------------------------------------------------------------------------------
// Context switch
// ---------------------------------------------------------------------------------------------
#if EMU_ASM_SWITCH
struct Ctx {
    void* sp;
};
}  // namespace
}  // namespace emu
// Saves the callee-saved registers of the SysV ABI on the current stack, stores the stack pointer
// in *save, loads `next` and restores the registers saved there.
extern "C" void emu_ctx_switch(void** save, void* next);
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
)");
namespace emu {
namespace {
inline void ctx_switch(Ctx* from, Ctx* to) { emu_ctx_switch(&from->sp, to->sp); }
void fiber_entry();
void ctx_init(Ctx* c, char* lo, size_t size) {
    uintptr_t top = reinterpret_cast<uintptr_t>(lo + size) & ~static_cast<uintptr_t>(15);
    uintptr_t* sp = reinterpret_cast<uintptr_t*>(top);
    *--sp = 0;  // fake return address: fiber_entry starts with rsp = 8 (mod 16), as after a call
    *--sp = reinterpret_cast<uintptr_t>(&fiber_entry);
    for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    c->sp = sp;
}
#else
struct Ctx {
    ucontext_t uc;
};
inline void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
void fiber_entry();
void ctx_init(Ctx* c, char* lo, size_t size) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, &fiber_entry, 0);
}
#endif

size_t fiber_stack_bytes() {
    static const size_t bytes = [] {
        size_t kb = 128;
        if (const char* s = getenv("EMU_FIBER_STACK_KB")) {
            long v = strtol(s, nullptr, 10);
            if (v >= 16) kb = static_cast<size_t>(v);
        }
        return kb * 1024;
    }();
    return bytes;
}

// ---------------------------------------------------------------------------------------------
// Per-OS-thread block state
// ---------------------------------------------------------------------------------------------
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned bytes, src_bytes;
    long group;  // -1 until committed
};
struct Fiber {
    Ctx ctx;
    uint8_t state;
    unsigned lin;
    uint3 idx;
    unsigned wphase;
    long next_group;
    std::vector<AsyncCopy> pending;
};

struct BlockRun {
    const KernelInfo* k = nullptr;
    const void* args = nullptr;
    unsigned n = 0, nwarps = 0;
    uint3 bdim{}, grid{}, bidx{};
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    size_t stack_bytes = 0, page = 0;
    Ctx sched;
    Fiber* cur = nullptr;
    int n_wait_block = 0, n_done = 0;
    unsigned bphase = 0;
    int bcount[2] = {0, 0};
    int warp_wait[32];
    unsigned warp_exist[32];
    unsigned warp_done[32];
    unsigned char* xbuf = nullptr;
    // The lanes released by a warp's last collective (read by each of them when it resumes, before
    // it can reach the next collective of the warp).
    unsigned warp_part[32];
    unsigned char* dyn = nullptr;
    size_t dyn_cap = 0;
    unsigned dyn_bytes = 0;
    bool poison = true;
    int schedule = 0;
    uint64_t rng = 0;
    std::vector<unsigned> order;
    int err = 0;
    std::string msg;

    BlockRun() {
        page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        stack_bytes = (fiber_stack_bytes() + page - 1) / page * page;
        xbuf = static_cast<unsigned char*>(aligned_alloc(128, kXbufBytes));
    }
    ~BlockRun() {
        for (char* s : stacks) munmap(s - page, stack_bytes + page);
        free(xbuf);
        free(dyn);
    }
    BlockRun(const BlockRun&) = delete;
    BlockRun& operator=(const BlockRun&) = delete;

    // Sizes fibers, stacks and dynamic shared memory for a launch. Returns false when out of memory.
    bool prepare(const KernelInfo* kernel, const void* a, uint3 block, uint3 g, unsigned smem, bool p, int sched_kind) {
        k = kernel;
        args = a;
        bdim = block;
        grid = g;
        n = block.x * block.y * block.z;
        nwarps = (n + 31) / 32;
        poison = p;
        schedule = sched_kind;
        if (fibers.size() < n) fibers.resize(n);
        while (stacks.size() < n) {
            void* m = mmap(nullptr, stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return false;
            mprotect(m, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
            stacks.push_back(static_cast<char*>(m) + page);
        }
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = fibers[i];
            f.lin = i;
            f.idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        }
        for (unsigned w = 0; w < 32; ++w) {
            unsigned lanes = w < nwarps ? std::min(32u, n - 32 * w) : 0;
            warp_exist[w] = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        }
        size_t need = std::max<size_t>(smem, 128);
        if (dyn_cap < need) {
            free(dyn);
            dyn_cap = (need + 127) / 128 * 128;
            dyn = static_cast<unsigned char*>(aligned_alloc(128, dyn_cap));
            if (!dyn) {
                dyn_cap = 0;
                return false;
            }
        }
        dyn_bytes = smem;
        order.resize(n);
        for (unsigned i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
        blockDim = block;
        gridDim = g;
        return true;
    }
};

thread_local BlockRun* tl_run = nullptr;
thread_local std::unique_ptr<BlockRun> tl_block;
thread_local std::string tl_last_error;

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

void complete_copies(Fiber* f, long below_group) {
    auto& v = f->pending;
    size_t keep = 0;
    for (size_t i = 0; i < v.size(); ++i) {
        AsyncCopy& c = v[i];
        if (c.group >= 0 && c.group < below_group) {
            if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
            if (c.bytes > c.src_bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
        } else {
            v[keep++] = c;
        }
    }
    v.resize(keep);
}

void fiber_entry() {
    BlockRun* r = tl_run;
    r->k->run(r->args);
    r = tl_run;
    Fiber* f = r->cur;
    // Copies still in flight are dropped: they can only target this block's shared memory, and
    // a correct kernel consumes a copy only after the issuing thread waited for it.
    f->pending.clear();
    f->state = kDone;
    r->n_done++;
    r->warp_done[f->lin >> 5] |= 1u << (f->lin & 31);
    ctx_switch(&f->ctx, &r->sched);
    fprintf(stderr, "emu: internal error: a finished fiber was resumed\n");
    abort();
}

inline void block_here(BlockRun* r, Fiber* f, uint8_t state) {
    f->state = state;
    ctx_switch(&f->ctx, &r->sched);
}

BlockRun* current(const char* what) {
    BlockRun* r = tl_run;
    if (!r || !r->cur) {
        fprintf(stderr, "emu: %s called outside a kernel launch\n", what);
        abort();
    }
    return r;
}

// Runs one block to completion. Returns an error code (r.msg holds the message).
int run_block(BlockRun& r, uint3 b, uint64_t seed, uint64_t block_linear) {
    blockIdx = b;
    r.bidx = b;
    r.err = 0;
    r.n_wait_block = 0;
    r.n_done = 0;
    r.bphase = 0;
    r.bcount[0] = r.bcount[1] = 0;
    for (unsigned w = 0; w < 32; ++w) {
        r.warp_wait[w] = 0;
        r.warp_done[w] = 0;
    }
    for (unsigned i = 0; i < r.n; ++i) {
        Fiber& f = r.fibers[i];
        f.state = kReady;
        f.wphase = 0;
        f.next_group = 0;
        f.pending.clear();
        ctx_init(&f.ctx, r.stacks[i], r.stack_bytes);
    }
    if (r.poison && r.dyn_bytes) std::memset(r.dyn, 0xff, r.dyn_bytes);
    r.rng = seed ^ ((block_linear + 1) * 0xD1B54A32D192ED03ull);
    // The random schedule of a block depends only on the seed and the block, not on which worker
    // ran which blocks before.
    if (r.schedule == 2) {
        for (unsigned i = 0; i < r.n; ++i) r.order[i] = i;
    }
    const unsigned n = r.n;
    for (;;) {
        if (r.schedule == 2) {
            for (unsigned i = n; i > 1; --i) {
                unsigned j = static_cast<unsigned>(splitmix(r.rng) % i);
                std::swap(r.order[i - 1], r.order[j]);
            }
        }
        for (unsigned oi = 0; oi < n; ++oi) {
            Fiber& f = r.fibers[r.order[oi]];
            if (f.state != kReady) continue;
            r.cur = &f;
            threadIdx = f.idx;
            ctx_switch(&r.sched, &f.ctx);
            if (r.err) {
                r.cur = nullptr;
                return r.err;
            }
        }
        r.cur = nullptr;
        if (r.n_done == static_cast<int>(n)) return kOk;
        bool released = false;
        if (r.n_wait_block == static_cast<int>(n)) {
            for (unsigned i = 0; i < n; ++i) r.fibers[i].state = kReady;
            r.n_wait_block = 0;
            r.bphase ^= 1;
            r.bcount[r.bphase] = 0;
            released = true;
        }
        // A warp collective completes when every lane that has not exited arrived (CUDA: "all
        // non-exited threads named in mask must execute" it).
        for (unsigned w = 0; w < r.nwarps; ++w) {
            if (r.warp_wait[w] > 0 && r.warp_wait[w] == __builtin_popcount(r.warp_exist[w] & ~r.warp_done[w])) {
                unsigned end = std::min(n, 32 * w + 32);
                unsigned part = 0;
                for (unsigned i = 32 * w; i < end; ++i) {
                    if (r.fibers[i].state == kWaitWarp) {  // not the exited lanes
                        r.fibers[i].state = kReady;
                        part |= 1u << (i & 31);
                    }
                }
                r.warp_part[w] = part;
                r.warp_wait[w] = 0;
                released = true;
            }
        }
        if (!released) {
            int in_warp = 0;
            for (unsigned w = 0; w < r.nwarps; ++w) in_warp += r.warp_wait[w];
            std::string detail;
            for (unsigned w = 0; w < r.nwarps; ++w) {
                if (r.warp_wait[w] > 0) {
                    detail = strf("; warp %u: %d of its %d live lanes wait in a warp collective", w, r.warp_wait[w],
                                  __builtin_popcount(r.warp_exist[w] & ~r.warp_done[w]));
                    break;
                }
            }
            r.msg = strf("deadlock in kernel `%s`, block (%u,%u,%u) of %u threads: %d wait in __syncthreads, %d in a warp "
                         "collective, %d exited (a barrier in divergent code, or a return before a barrier)",
                         r.k->name, b.x, b.y, b.z, n, r.n_wait_block, in_warp, r.n_done) +
                    detail;
            return kDeadlock;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launches and the worker pool
// ---------------------------------------------------------------------------------------------
struct Launch {
    const KernelInfo* k = nullptr;
    const void* args = nullptr;
    uint3 grid{}, block{};
    unsigned smem = 0;
    EmuOptions opt{};
    uint64_t total = 0;
    std::vector<uint32_t> random_order;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::condition_variable cv;
    int active = 0;
    bool closed = false;
    int err = 0;
    uint64_t err_index = UINT64_MAX;
    std::string msg;

    uint64_t block_at(uint64_t i) const {
        if (opt.schedule == 1) return total - 1 - i;
        if (opt.schedule == 2) return random_order[i];
        return i;
    }
    void record(uint64_t index, int code, std::string message) {
        std::lock_guard<std::mutex> g(m);
        if (index < err_index) {
            err_index = index;
            err = code;
            msg = std::move(message);
        }
        failed = true;
    }
};

void work(Launch& L) {
    if (!tl_block) tl_block = std::make_unique<BlockRun>();
    BlockRun& r = *tl_block;
    if (!r.prepare(L.k, L.args, L.block, L.grid, L.smem, L.opt.poison != 0, L.opt.schedule)) {
        L.record(0, kInvalidConfig, strf("kernel `%s`: out of memory for fiber stacks or shared memory", L.k->name));
        return;
    }
    tl_run = &r;
    const uint64_t gx = L.grid.x, gy = L.grid.y;
    while (!L.failed.load(std::memory_order_relaxed)) {
        uint64_t i = L.next.fetch_add(1);
        if (i >= L.total) break;
        uint64_t lin = L.block_at(i);
        uint3 b{static_cast<unsigned>(lin % gx), static_cast<unsigned>((lin / gx) % gy), static_cast<unsigned>(lin / (gx * gy))};
        int code = run_block(r, b, L.opt.seed, lin);
        if (code) L.record(i, code, r.msg);
    }
    tl_run = nullptr;
}

struct Pool {
    std::mutex m;
    std::condition_variable cv;
    std::deque<std::function<void()>> q;
    unsigned threads = 0;
};
Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: its threads are detached
    return *p;
}
void submit(std::function<void()> task, unsigned want_threads) {
    Pool& p = pool();
    std::lock_guard<std::mutex> g(p.m);
    p.q.push_back(std::move(task));
    while (p.threads < want_threads) {
        ++p.threads;
        std::thread([&p] {
            for (;;) {
                std::function<void()> t;
                {
                    std::unique_lock<std::mutex> lk(p.m);
                    p.cv.wait(lk, [&p] { return !p.q.empty(); });
                    t = std::move(p.q.front());
                    p.q.pop_front();
                }
                t();
            }
        }).detach();
    }
    p.cv.notify_one();
}

int set_error(int code, std::string msg) {
    tl_last_error = std::move(msg);
    return code;
}

EmuOptions env_options() {
    EmuOptions o{};
    o.poison = 1;
    o.workers = 1;
    if (const char* s = getenv("EMU_SCHEDULE")) {
        if (!strcmp(s, "reverse")) o.schedule = 1;
        if (!strcmp(s, "random")) o.schedule = 2;
    }
    if (const char* s = getenv("EMU_SEED")) o.seed = strtoull(s, nullptr, 0);
    if (const char* s = getenv("EMU_WORKERS")) o.workers = static_cast<uint32_t>(std::max(1l, strtol(s, nullptr, 10)));
    if (const char* s = getenv("EMU_POISON")) o.poison = strcmp(s, "0") != 0;
    return o;
}

int launch(const char* name, const unsigned* g, const unsigned* bl, unsigned smem, void** params, unsigned nparams,
           const EmuOptions& opt) {
    tl_last_error.clear();
    if (tl_run) return set_error(kInvalidConfig, strf("kernel `%s` launched from inside a kernel (not supported)", name));
    const KernelInfo* k = nullptr;
    {
        Registry& reg = registry();
        std::lock_guard<std::mutex> lk(reg.m);
        auto it = reg.map.find(name);
        if (it == reg.map.end()) {
            return set_error(kUnknownKernel, strf("unknown kernel `%s`: no EMU_KERNEL(%s) in kernels/*.cu (%zu kernels registered)",
                                                  name, name, reg.map.size()));
        }
        if (it->second.sites.size() > 1) {
            std::string sites;
            for (auto& s : it->second.sites) sites += (sites.empty() ? "" : ", ") + s;
            return set_error(kDuplicate, strf("kernel name `%s` is registered %zu times (%s): EMU_KERNEL names must be unique", name,
                                              it->second.sites.size(), sites.c_str()));
        }
        k = it->second.info;
    }
    const uint3 grid{g[0], g[1], g[2]}, block{bl[0], bl[1], bl[2]};
    const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
    if (!block.x || !block.y || !block.z || block.x > 1024 || block.y > 1024 || block.z > 64 || nthreads > 1024) {
        return set_error(kInvalidConfig, strf("invalid launch configuration for `%s`: block (%u,%u,%u) (at most 1024 threads, "
                                              "x,y <= 1024, z <= 64)",
                                              name, block.x, block.y, block.z));
    }
    if (!grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        return set_error(kInvalidConfig, strf("invalid launch configuration for `%s`: grid (%u,%u,%u)", name, grid.x, grid.y, grid.z));
    }
    if (smem > kMaxSharedDyn) {
        return set_error(kInvalidConfig, strf("invalid launch configuration for `%s`: %u bytes of dynamic shared memory (at most %u)",
                                              name, smem, kMaxSharedDyn));
    }
    if (nparams != k->nparams) {
        return set_error(kInvalidConfig, strf("kernel `%s` (%s:%d) takes %u parameters, the launch passed %u", name, k->file, k->line,
                                              k->nparams, nparams));
    }
    for (unsigned i = 0; i < k->nparams; ++i) {
        if (k->param_sizes[i] > 8) {
            return set_error(kInvalidConfig, strf("kernel `%s`: parameter %u is %u bytes; launch argument slots hold 8", name, i,
                                                  k->param_sizes[i]));
        }
    }
    if (k->nparams && !params) return set_error(kInvalidConfig, strf("kernel `%s`: null parameter array", name));

    auto L = std::make_shared<Launch>();
    L->k = k;
    L->grid = grid;
    L->block = block;
    L->smem = smem;
    L->opt = opt;
    if (L->opt.schedule < 0 || L->opt.schedule > 2) L->opt.schedule = 0;
    L->total = uint64_t(grid.x) * grid.y * grid.z;
    if (L->opt.schedule == 2 && L->total > UINT32_MAX) {
        return emu::set_error(kInvalidConfig, strf("kernel `%s`: grid too large for the random schedule", name));
    }
    if (L->opt.schedule == 2) {
        L->random_order.resize(L->total);
        for (uint64_t i = 0; i < L->total; ++i) L->random_order[i] = static_cast<uint32_t>(i);
        uint64_t s = opt.seed ^ 0x6A09E667F3BCC909ull;
        for (uint64_t i = L->total; i > 1; --i) std::swap(L->random_order[i - 1], L->random_order[splitmix(s) % i]);
    }
    void* args = k->make_args(params);
    L->args = args;
    const uint64_t workers = std::min<uint64_t>(std::max<uint32_t>(opt.workers, 1u), L->total);
    for (uint64_t w = 1; w < workers; ++w) {
        submit(
            [L] {
                {
                    std::lock_guard<std::mutex> lk(L->m);
                    if (L->closed) return;
                    ++L->active;
                }
                work(*L);
                {
                    std::lock_guard<std::mutex> lk(L->m);
                    --L->active;
                }
                L->cv.notify_all();
            },
            static_cast<unsigned>(workers - 1));
    }
    work(*L);
    {
        std::unique_lock<std::mutex> lk(L->m);
        L->closed = true;
        L->cv.wait(lk, [&] { return L->active == 0; });
    }
    k->free_args(args);
    if (L->err) return set_error(L->err, L->msg);
    return kOk;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Device-side entry points (declared in cuda_emu.h)
// ---------------------------------------------------------------------------------------------
int register_kernel(const KernelInfo* info) {
    Registry& reg = registry();
    std::lock_guard<std::mutex> lk(reg.m);
    Entry& e = reg.map[info->name];
    if (!e.info) e.info = info;
    e.sites.push_back(strf("%s:%d", info->file, info->line));
    return static_cast<int>(e.sites.size());
}

void syncthreads() { (void)syncthreads_count(0); }

int syncthreads_count(int pred) {
    BlockRun* r = current("__syncthreads");
    Fiber* f = r->cur;
    const unsigned phase = r->bphase;
    r->bcount[phase] += pred != 0;
    r->n_wait_block++;
    block_here(r, f, kWaitBlock);
    return r->bcount[phase];
}

void syncwarp(unsigned mask) {
    unsigned part;
    (void)warp_exchange(mask, nullptr, 0, "__syncwarp", &part);
}

const unsigned char* warp_exchange(unsigned mask, const void* src, unsigned bytes, const char* what, unsigned* participants) {
    BlockRun* r = current(what);
    Fiber* f = r->cur;
    const unsigned w = f->lin >> 5, lane = f->lin & 31;
    if (!((mask >> lane) & 1u)) fail("%s: mask 0x%08x does not include the calling lane %u (partial-warp masks are not emulated)", what, mask, lane);
    // Double-buffered: a lane can only write this phase again two collectives later, after every
    // lane has passed the collective in between and so has read this one.
    const unsigned slot0 = (w * 2 + f->wphase) * 32;
    f->wphase ^= 1;
    if (bytes) std::memcpy(r->xbuf + (slot0 + lane) * kSlot, src, bytes);
    r->warp_wait[w]++;
    block_here(r, f, kWaitWarp);
    const unsigned part = r->warp_part[w];
    if ((mask & part) != part) {
        fail("%s: mask 0x%08x does not name every participating lane (0x%08x); partial-warp masks are not emulated", what, mask,
             part);
    }
    *participants = part;
    return r->xbuf + slot0 * kSlot;
}

unsigned warp_lanes() {
    BlockRun* r = current("warp_lanes");
    return r->warp_exist[r->cur->lin >> 5];
}

unsigned active_mask() {
    BlockRun* r = current("__activemask");
    const unsigned w = r->cur->lin >> 5;
    return r->warp_exist[w] & ~r->warp_done[w];
}

void fail(const char* fmt, ...) {
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    BlockRun* r = tl_run;
    if (!r || !r->cur) {
        fprintf(stderr, "emu: %s (outside a kernel launch)\n", buf);
        abort();
    }
    Fiber* f = r->cur;
    r->msg = strf("kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u): %s", r->k->name, r->bidx.x, r->bidx.y, r->bidx.z, f->idx.x,
                  f->idx.y, f->idx.z, buf);
    r->err = kKernelFailed;
    block_here(r, f, kFailed);  // never resumed: the launch is abandoned
    fprintf(stderr, "emu: internal error: a failed fiber was resumed\n");
    abort();
}

unsigned char* dyn_smem() { return current("dynamic shared memory")->dyn; }
unsigned dyn_smem_bytes() { return current("dynamic shared memory")->dyn_bytes; }

void async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
    BlockRun* r = current("cp.async");
    if (src_bytes > bytes) fail("cp.async: src-size %u exceeds cp-size %u", src_bytes, bytes);
    r->cur->pending.push_back(AsyncCopy{dst, src, bytes, src_bytes, -1});
}

void async_commit() {
    Fiber* f = current("cp.async.commit_group")->cur;
    for (AsyncCopy& c : f->pending) {
        if (c.group < 0) c.group = f->next_group;
    }
    f->next_group++;
}

void async_wait(int pending_groups) {
    Fiber* f = current("cp.async.wait_group")->cur;
    complete_copies(f, f->next_group - pending_groups);
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// C ABI
// ---------------------------------------------------------------------------------------------
extern "C" {
// Launches kernel `name` like cuLaunchKernel (params[i] points at argument i; nparams is checked
// against the kernel's parameter count). Synchronous. Returns 0, or an error code with the message
// in emu_last_error(): 1 unknown kernel, 2 deadlock, 3 the kernel failed (emu::fail), 4 invalid
// configuration or arguments, 5 duplicate kernel name.
int emu_launch_ex(const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem, void** params, unsigned nparams,
                  const EmuOptions* opts) {
    EmuOptions o = opts ? *opts : emu::env_options();
    return emu::launch(name, grid, block, smem, params, nparams, o);
}

// As emu_launch_ex with options from EMU_SCHEDULE, EMU_SEED, EMU_WORKERS, EMU_POISON.
int emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem, void** params, unsigned nparams) {
    return emu_launch_ex(name, grid, block, smem, params, nparams, nullptr);
}

// The message of this OS thread's last failed launch ("" after a successful one).
const char* emu_last_error(void) { return emu::tl_last_error.c_str(); }

unsigned emu_kernel_count(void) {
    auto& reg = emu::registry();
    std::lock_guard<std::mutex> lk(reg.m);
    return static_cast<unsigned>(reg.map.size());
}

// The i-th registered kernel name in sorted order (null when out of range).
const char* emu_kernel_name(unsigned i) {
    auto& reg = emu::registry();
    std::lock_guard<std::mutex> lk(reg.m);
    if (i >= reg.map.size()) return nullptr;
    auto it = reg.map.begin();
    std::advance(it, i);
    return it->first.c_str();
}
}
