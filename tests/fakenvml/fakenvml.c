/*
 * A fake NVIDIA Management Library for tests: built as libnvidia-ml.so.1 and
 * loaded by the real nvidia-ml-py bindings, so the agent's ctypes calls,
 * struct layouts and error codes are exercised without a GPU.
 *
 * Everything it reports comes from a text state file named by the
 * FAKENVML_STATE environment variable. The file is re-read whenever its
 * inode, size or modification time changes, so a test may rewrite it (write
 * a temporary file and rename it over) while the agent runs. One record per
 * line, "#" starts a comment:
 *
 *   init ok | driver_not_loaded | lib_rm_version_mismatch
 *   driver 550.54.15
 *   device index=0 uuid=GPU-... energy_mj=0 epoch_s=0 power_mw=100000
 *          wave_mw=0 wave_period_s=1 util_gpu=0 util_mem=0 mem_total=0
 *          mem_used=0 power_limit_mw=300000 mig=0 lost=0 unsupported=a,b
 *   name 0 NVIDIA A100-SXM4-80GB            (the rest of the line)
 *   process gpu=0 pid=1234 mem=1073741824 gi=0 ci=0 sm=30 memutil=10
 *   sample gpu=0 pid=1234 ts=1000 sm=30 mem=10
 *   mig gpu=0 uuid=MIG-... gi=1 ci=0 slices=3 util=20   (util= optional)
 *
 * Power in milliwatts is power_mw + wave_mw * sin(2 pi t / wave_period_s)
 * with t the CLOCK_MONOTONIC seconds since epoch_s. With epoch_s > 0 the
 * energy counter (millijoules) is energy_mj plus the exact integral of that
 * power since epoch_s; with epoch_s = 0 it is energy_mj as written.
 *
 * Per-process utilisation: every process with sm= yields one sample stamped
 * with the current CLOCK_REALTIME microseconds rounded down to 100 ms (NVML
 * samples on its own period); explicit sample lines are returned as written.
 * Only samples newer than the caller's last-seen timestamp are returned, and
 * none at all is NVML_ERROR_NOT_FOUND, as with the real library.
 *
 * unsupported= lists calls that answer NVML_ERROR_NOT_SUPPORTED: energy,
 * power, util, memory, power_limit, mig, procs, procutil. mig=1 makes
 * procutil unsupported as well, as on real MIG devices. lost=1 makes every
 * call on the device answer NVML_ERROR_GPU_IS_LOST.
 *
 * MIG: on a device with mig=1, nvmlDeviceGetMaxMigDeviceCount is 7 and
 * nvmlDeviceGetMigDeviceHandleByIndex hands out the device's mig records in
 * order (NVML_ERROR_NOT_FOUND past them). A MIG handle answers its UUID, GPU
 * and compute instance ids, attributes (gpuInstanceSliceCount = slices) and,
 * where util= is given, utilisation; without util= utilisation is
 * NVML_ERROR_NOT_SUPPORTED, as on most drivers.
 *
 * Built with -DFAKENVML_NO_PROCESS_V3 it lacks the _v3 process-list symbol,
 * like a driver older than the bindings.
 *
 * Only read calls exist: any attempt to change a GPU setting fails in the
 * bindings with NVML_ERROR_FUNCTION_NOT_FOUND.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_DEVICES 16
#define MAX_PROCS 64
#define MAX_SAMPLES 256
#define MAX_MIGS 32

typedef struct nvmlDevice_st { int slot; } *nvmlDevice_t;

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

struct device {
    unsigned int index;
    char uuid[96], name[96];
    double energy_mj, epoch_s, power_mw, wave_mw, wave_period_s;
    unsigned int util_gpu, util_mem, power_limit_mw, mig, lost;
    unsigned long long mem_total, mem_used;
    char unsupported[256];
};
struct process {
    unsigned int gpu, pid, gi, ci, sm, memutil, has_sm;
    unsigned long long mem;
};
struct sample {
    unsigned int gpu, pid, sm, mem;
    unsigned long long ts;
};
struct mig {
    unsigned int gpu, gi, ci, slices, util, has_util;
    char uuid[96];
};

static struct {
    char init[64], driver[64];
    int ndevices, nprocs, nsamples, nmigs;
    struct device devices[MAX_DEVICES];
    struct process procs[MAX_PROCS];
    struct sample samples[MAX_SAMPLES];
    struct mig migs[MAX_MIGS];
} st;

static struct nvmlDevice_st handles[MAX_DEVICES];
static struct nvmlDevice_st mig_handles[MAX_MIGS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct stat loaded;
static int have_loaded, initialised;

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long long realtime_us(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + tv.tv_usec;
}

static const char *value_of(const char *line, const char *key) {
    size_t n = strlen(key);
    for (const char *p = line; (p = strstr(p, key)) != NULL; p += n) {
        if ((p == line || p[-1] == ' ' || p[-1] == '\t') && p[n] == '=')
            return p + n + 1;
    }
    return NULL;
}

static double num(const char *line, const char *key, double fallback) {
    const char *v = value_of(line, key);
    return v ? strtod(v, NULL) : fallback;
}

static void word(const char *line, const char *key, char *out, size_t size) {
    const char *v = value_of(line, key);
    size_t i = 0;
    out[0] = 0;
    if (!v) return;
    while (v[i] && v[i] != ' ' && v[i] != '\t' && v[i] != '\n' && i + 1 < size) {
        out[i] = v[i];
        i++;
    }
    out[i] = 0;
}

static void parse(FILE *f) {
    char line[1024];
    memset(&st, 0, sizeof st);
    strcpy(st.init, "ok");
    strcpy(st.driver, "550.54.15");
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        if (!strncmp(line, "init ", 5)) {
            sscanf(line + 5, "%63s", st.init);
        } else if (!strncmp(line, "driver ", 7)) {
            sscanf(line + 7, "%63s", st.driver);
        } else if (!strncmp(line, "device ", 7) && st.ndevices < MAX_DEVICES) {
            struct device *d = &st.devices[st.ndevices++];
            d->index = (unsigned int)num(line, "index", st.ndevices - 1);
            word(line, "uuid", d->uuid, sizeof d->uuid);
            snprintf(d->name, sizeof d->name, "Fake GPU");
            d->energy_mj = num(line, "energy_mj", 0);
            d->epoch_s = num(line, "epoch_s", 0);
            d->power_mw = num(line, "power_mw", 0);
            d->wave_mw = num(line, "wave_mw", 0);
            d->wave_period_s = num(line, "wave_period_s", 1);
            d->util_gpu = (unsigned int)num(line, "util_gpu", 0);
            d->util_mem = (unsigned int)num(line, "util_mem", 0);
            d->mem_total = (unsigned long long)num(line, "mem_total", 0);
            d->mem_used = (unsigned long long)num(line, "mem_used", 0);
            d->power_limit_mw = (unsigned int)num(line, "power_limit_mw", 300000);
            d->mig = (unsigned int)num(line, "mig", 0);
            d->lost = (unsigned int)num(line, "lost", 0);
            word(line, "unsupported", d->unsupported, sizeof d->unsupported);
        } else if (!strncmp(line, "name ", 5)) {
            char *end;
            long slot = strtol(line + 5, &end, 10);
            while (*end == ' ') end++;
            end[strcspn(end, "\r\n")] = 0;
            if (slot >= 0 && slot < st.ndevices)
                snprintf(st.devices[slot].name, sizeof st.devices[slot].name, "%s", end);
        } else if (!strncmp(line, "process ", 8) && st.nprocs < MAX_PROCS) {
            struct process *p = &st.procs[st.nprocs++];
            p->gpu = (unsigned int)num(line, "gpu", 0);
            p->pid = (unsigned int)num(line, "pid", 0);
            p->mem = (unsigned long long)num(line, "mem", 0);
            p->gi = (unsigned int)num(line, "gi", 0xFFFFFFFF);
            p->ci = (unsigned int)num(line, "ci", 0xFFFFFFFF);
            p->has_sm = value_of(line, "sm") != NULL;
            p->sm = (unsigned int)num(line, "sm", 0);
            p->memutil = (unsigned int)num(line, "memutil", 0);
        } else if (!strncmp(line, "sample ", 7) && st.nsamples < MAX_SAMPLES) {
            struct sample *s = &st.samples[st.nsamples++];
            s->gpu = (unsigned int)num(line, "gpu", 0);
            s->pid = (unsigned int)num(line, "pid", 0);
            s->ts = (unsigned long long)num(line, "ts", 0);
            s->sm = (unsigned int)num(line, "sm", 0);
            s->mem = (unsigned int)num(line, "mem", 0);
        } else if (!strncmp(line, "mig ", 4) && st.nmigs < MAX_MIGS) {
            struct mig *m = &st.migs[st.nmigs++];
            m->gpu = (unsigned int)num(line, "gpu", 0);
            word(line, "uuid", m->uuid, sizeof m->uuid);
            m->gi = (unsigned int)num(line, "gi", 0);
            m->ci = (unsigned int)num(line, "ci", 0);
            m->slices = (unsigned int)num(line, "slices", 1);
            m->has_util = value_of(line, "util") != NULL;
            m->util = (unsigned int)num(line, "util", 0);
        }
    }
}

/* Called with the lock held: re-read the state file if it changed. */
static void refresh(void) {
    const char *path = getenv("FAKENVML_STATE");
    struct stat now;
    if (!path || stat(path, &now) != 0) {
        memset(&st, 0, sizeof st);
        strcpy(st.init, "driver_not_loaded");
        have_loaded = 0;
        return;
    }
    if (have_loaded && now.st_ino == loaded.st_ino && now.st_size == loaded.st_size &&
        now.st_mtim.tv_sec == loaded.st_mtim.tv_sec && now.st_mtim.tv_nsec == loaded.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    parse(f);
    fclose(f);
    loaded = now;
    have_loaded = 1;
}

static int unsupported(const struct device *d, const char *call) {
    size_t n = strlen(call);
    for (const char *p = d->unsupported; (p = strstr(p, call)) != NULL; p += n)
        if ((p == d->unsupported || p[-1] == ',') && (p[n] == 0 || p[n] == ','))
            return 1;
    return 0;
}

/* Lock, refresh, and find the device behind a handle, or return an error. */
static nvmlReturn_t enter(nvmlDevice_t h, const char *call, struct device **out) {
    pthread_mutex_lock(&lock);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    refresh();
    if (!h || h < handles || h >= handles + MAX_DEVICES || h->slot >= st.ndevices)
        return NVML_ERROR_INVALID_ARGUMENT;
    *out = &st.devices[h->slot];
    if ((*out)->lost) return NVML_ERROR_GPU_IS_LOST;
    if (call && unsupported(*out, call)) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

static int is_mig_handle(nvmlDevice_t h) {
    return h && h >= mig_handles && h < mig_handles + MAX_MIGS;
}

/* Lock, refresh, and find the MIG device behind a MIG handle. */
static nvmlReturn_t enter_mig(nvmlDevice_t h, struct mig **out) {
    pthread_mutex_lock(&lock);
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    refresh();
    if (!is_mig_handle(h) || h->slot >= st.nmigs) return NVML_ERROR_INVALID_ARGUMENT;
    *out = &st.migs[h->slot];
    return NVML_SUCCESS;
}

#define LEAVE(ret) do { nvmlReturn_t r_ = (ret); pthread_mutex_unlock(&lock); return r_; } while (0)

static double power_at(const struct device *d, double t) {
    double x = t - d->epoch_s;
    return d->power_mw + d->wave_mw * sin(2 * M_PI * x / d->wave_period_s);
}

static double energy_at(const struct device *d, double t) {
    if (d->epoch_s <= 0) return d->energy_mj;
    double x = t - d->epoch_s;
    double w = 2 * M_PI / d->wave_period_s;
    return d->energy_mj + d->power_mw * x + d->wave_mw / w * (1 - cos(w * x));
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    have_loaded = 0;
    refresh();
    if (!strcmp(st.init, "driver_not_loaded")) LEAVE(NVML_ERROR_DRIVER_NOT_LOADED);
    if (!strcmp(st.init, "lib_rm_version_mismatch")) LEAVE(NVML_ERROR_LIB_RM_VERSION_MISMATCH);
    for (int i = 0; i < MAX_DEVICES; i++) handles[i].slot = i;
    for (int i = 0; i < MAX_MIGS; i++) mig_handles[i].slot = i;
    initialised = 1;
    LEAVE(NVML_SUCCESS);
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (!initialised) LEAVE(NVML_ERROR_UNINITIALIZED);
    initialised = 0;
    LEAVE(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    pthread_mutex_lock(&lock);
    if (!initialised) LEAVE(NVML_ERROR_UNINITIALIZED);
    refresh();
    if (strlen(st.driver) + 1 > length) LEAVE(NVML_ERROR_INSUFFICIENT_SIZE);
    strcpy(version, st.driver);
    LEAVE(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    pthread_mutex_lock(&lock);
    if (!initialised) LEAVE(NVML_ERROR_UNINITIALIZED);
    refresh();
    *count = (unsigned int)st.ndevices;
    LEAVE(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    pthread_mutex_lock(&lock);
    if (!initialised) LEAVE(NVML_ERROR_UNINITIALIZED);
    refresh();
    if (index >= (unsigned int)st.ndevices) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
    *device = &handles[index];
    LEAVE(st.devices[index].lost ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t h, unsigned int *index) {
    struct device *d;
    nvmlReturn_t r = enter(h, NULL, &d);
    if (r == NVML_SUCCESS) *index = d->index;
    LEAVE(r);
}

static nvmlReturn_t copy_string(const char *s, char *out, unsigned int length) {
    if (strlen(s) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, s);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *uuid, unsigned int length) {
    struct device *d;
    if (is_mig_handle(h)) {
        struct mig *m;
        nvmlReturn_t r = enter_mig(h, &m);
        if (r == NVML_SUCCESS) r = copy_string(m->uuid, uuid, length);
        LEAVE(r);
    }
    nvmlReturn_t r = enter(h, NULL, &d);
    if (r == NVML_SUCCESS) r = copy_string(d->uuid, uuid, length);
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned int length) {
    struct device *d;
    nvmlReturn_t r = enter(h, NULL, &d);
    if (r == NVML_SUCCESS) r = copy_string(d->name, name, length);
    LEAVE(r);
}

/* nvmlPciInfo_t as NVML 11+ lays it out: every fake GPU sits on its own bus. */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t h, nvmlPciInfo_t *pci) {
    struct device *d;
    nvmlReturn_t r = enter(h, NULL, &d);
    if (r == NVML_SUCCESS) {
        memset(pci, 0, sizeof *pci);
        pci->bus = 0x17 + d->index;
        pci->pciDeviceId = 0x233010de;
        snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    }
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t h, unsigned long long *energy) {
    struct device *d;
    nvmlReturn_t r = enter(h, "energy", &d);
    if (r == NVML_SUCCESS) *energy = (unsigned long long)energy_at(d, monotonic_s());
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t h, unsigned int *power) {
    struct device *d;
    nvmlReturn_t r = enter(h, "power", &d);
    if (r == NVML_SUCCESS) {
        double p = power_at(d, monotonic_s());
        *power = p > 0 ? (unsigned int)(p + 0.5) : 0;
    }
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t *util) {
    struct device *d;
    if (is_mig_handle(h)) {
        struct mig *m;
        nvmlReturn_t r = enter_mig(h, &m);
        if (r == NVML_SUCCESS && !m->has_util) r = NVML_ERROR_NOT_SUPPORTED;
        if (r == NVML_SUCCESS) {
            util->gpu = m->util;
            util->memory = 0;
        }
        LEAVE(r);
    }
    nvmlReturn_t r = enter(h, "util", &d);
    if (r == NVML_SUCCESS) {
        util->gpu = d->util_gpu;
        util->memory = d->util_mem;
    }
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *memory) {
    struct device *d;
    nvmlReturn_t r = enter(h, "memory", &d);
    if (r == NVML_SUCCESS) {
        memory->total = d->mem_total;
        memory->used = d->mem_used;
        memory->free = d->mem_total > d->mem_used ? d->mem_total - d->mem_used : 0;
    }
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t h, unsigned int *limit) {
    struct device *d;
    nvmlReturn_t r = enter(h, "power_limit", &d);
    if (r == NVML_SUCCESS) *limit = d->power_limit_mw;
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t h, unsigned int *limit) {
    return nvmlDeviceGetEnforcedPowerLimit(h, limit);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t h, unsigned int *current, unsigned int *pending) {
    struct device *d;
    nvmlReturn_t r = enter(h, "mig", &d);
    if (r == NVML_SUCCESS) *current = *pending = d->mig;
    LEAVE(r);
}

static nvmlReturn_t running_processes(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos) {
    struct device *d;
    nvmlReturn_t r = enter(h, "procs", &d);
    if (r != NVML_SUCCESS) LEAVE(r);
    unsigned int n = 0;
    for (int i = 0; i < st.nprocs; i++)
        if (st.procs[i].gpu == (unsigned int)h->slot) n++;
    if (n == 0) {
        *count = 0;
        LEAVE(NVML_SUCCESS);
    }
    if (!infos || *count < n) {
        *count = n;
        LEAVE(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    n = 0;
    for (int i = 0; i < st.nprocs; i++) {
        struct process *p = &st.procs[i];
        if (p->gpu != (unsigned int)h->slot) continue;
        infos[n].pid = p->pid;
        infos[n].usedGpuMemory = p->mem;
        infos[n].gpuInstanceId = p->gi;
        infos[n].computeInstanceId = p->ci;
        n++;
    }
    *count = n;
    LEAVE(NVML_SUCCESS);
}

#ifndef FAKENVML_NO_PROCESS_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos) {
    return running_processes(h, count, infos);
}
#endif

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos) {
    return running_processes(h, count, infos);
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t h, nvmlProcessUtilizationSample_t *out,
                                             unsigned int *count, unsigned long long lastSeen) {
    struct device *d;
    nvmlReturn_t r = enter(h, "procutil", &d);
    if (r != NVML_SUCCESS) LEAVE(r);
    if (d->mig) LEAVE(NVML_ERROR_NOT_SUPPORTED);
    unsigned long long now = realtime_us() / 100000ULL * 100000ULL;
    nvmlProcessUtilizationSample_t found[MAX_PROCS + MAX_SAMPLES];
    unsigned int n = 0;
    for (int i = 0; i < st.nprocs; i++) {
        struct process *p = &st.procs[i];
        if (p->gpu != (unsigned int)h->slot || !p->has_sm || now <= lastSeen) continue;
        found[n++] = (nvmlProcessUtilizationSample_t){p->pid, now, p->sm, p->memutil, 0, 0};
    }
    for (int i = 0; i < st.nsamples; i++) {
        struct sample *s = &st.samples[i];
        if (s->gpu != (unsigned int)h->slot || s->ts <= lastSeen) continue;
        found[n++] = (nvmlProcessUtilizationSample_t){s->pid, s->ts, s->sm, s->mem, 0, 0};
    }
    if (n == 0) LEAVE(NVML_ERROR_NOT_FOUND);
    if (!out || *count < n) {
        *count = n;
        LEAVE(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    memcpy(out, found, n * sizeof *out);
    *count = n;
    LEAVE(NVML_SUCCESS);
}

typedef struct {
    unsigned int multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount, sharedEncoderCount,
        sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t h, unsigned int *count) {
    struct device *d;
    nvmlReturn_t r = enter(h, "mig", &d);
    if (r == NVML_SUCCESS) *count = d->mig ? 7 : 0;
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t h, unsigned int index, nvmlDevice_t *out) {
    struct device *d;
    nvmlReturn_t r = enter(h, "mig", &d);
    if (r != NVML_SUCCESS) LEAVE(r);
    if (!d->mig) LEAVE(NVML_ERROR_NOT_SUPPORTED);
    unsigned int seen = 0;
    for (int i = 0; i < st.nmigs; i++) {
        if (st.migs[i].gpu != (unsigned int)h->slot) continue;
        if (seen++ == index) {
            *out = &mig_handles[i];
            LEAVE(NVML_SUCCESS);
        }
    }
    LEAVE(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t h, unsigned int *is_mig) {
    *is_mig = (unsigned int)is_mig_handle(h);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t h, unsigned int *id) {
    struct mig *m;
    nvmlReturn_t r = enter_mig(h, &m);
    if (r == NVML_SUCCESS) *id = m->gi;
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t h, unsigned int *id) {
    struct mig *m;
    nvmlReturn_t r = enter_mig(h, &m);
    if (r == NVML_SUCCESS) *id = m->ci;
    LEAVE(r);
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t h, nvmlDeviceAttributes_t *attrs) {
    struct mig *m;
    nvmlReturn_t r = enter_mig(h, &m);
    if (r == NVML_SUCCESS) {
        memset(attrs, 0, sizeof *attrs);
        attrs->gpuInstanceSliceCount = m->slices;
        attrs->computeInstanceSliceCount = m->slices;
        attrs->multiprocessorCount = 14 * m->slices;
        attrs->memorySizeMB = 10240ULL * m->slices;
    }
    LEAVE(r);
}
