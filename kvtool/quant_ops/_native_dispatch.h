// Run-time ISA choice and the per-call worker threads, shared by the Python extension (_native.cpp) and the
// OpenVINO extension op (runtime/engines/_ov_packed_op.cpp). Included inside an anonymous namespace, after the
// including file has defined KV_HAVE_AVX2 where it compiled the AVX2 kernels; needs <cstdlib>, <cstring>,
// <thread> and <vector>.

// Whether the AVX2+FMA+F16C kernels run: cpuid, once; KVTOOL_NATIVE_ISA=baseline forces the portable code (tests).
inline bool use_avx2() {
#ifdef KV_HAVE_AVX2
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        const char* force = getenv("KVTOOL_NATIVE_ISA");
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
            !(force && strcmp(force, "baseline") == 0);
    }
    return v != 0;
#else
    return false;
#endif
}

// Run `worker` on the calling thread and on nth - 1 std::threads started for this call, then join them (no
// spinning pool between calls: OpenMP's would burn a core after every layer).
template <class F>
inline void run_workers(long nth, F& worker) {
    std::vector<std::thread> pool;
    for (long i = 1; i < nth; ++i) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}
