"""One client's local training alone, the RSS after each step (the investigation behind
docs/performance.md, "What holds it"): `python -m benchmarks.probe_training_rss STEPS [tm] [trim]`.
`tm` also counts the tensors alive at once during the training (`cost.memory.TensorMemory`; slow),
`trim` calls glibc `malloc_trim(0)` afterwards and prints the RSS again. Allocator settings come from
the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX, ONEDNN_PRIMITIVE_CACHE_CAPACITY ...).
Each line: phase (peak RSS MB since the previous line, RSS MB now). Not run by `make bench`."""
import ctypes
import sys
import tempfile
from pathlib import Path
def st(k):
    for l in open("/proc/self/status"):
        if l.startswith(k+":"): return int(l.split()[1])/1024
def reset(): open("/proc/self/clear_refs","w").write("5")
out = {}
def mark(n):
    out[n] = (round(st("VmHWM")), round(st("VmRSS"))); print(n, out[n], flush=True); reset()
import torch
from flexmoe.config import load_config
from flexmoe.methods.build import build_method
from flexmoe.engine.client import ClientRunner
from flexmoe.engine.model import load_model, shared_params
from flexmoe.clients import partition_data, make_client
from flexmoe.rundir import ClientStore
from flexmoe.tensors import cpu_clone
from flexmoe.cost.memory import TensorMemory
from flexmoe.train import loop
mark("imports")
steps = int(sys.argv[1]); tm = "tm" in sys.argv[2:]
config = load_config(None, ["num_clients=2", f"train.local_steps={steps}", "runtime.threads=1"])
torch.set_num_threads(1)
method = build_method(config); model, tok = load_model(config, method)
initial = cpu_clone(shared_params(model, method))
mark("model")
parts = partition_data(config)
mark("partition")
client = make_client(config, parts[0], tok)
mark("tokenise client 0")
runner = ClientRunner(config, method, model, tok, ClientStore(Path(tempfile.mkdtemp())), lambda: initial)
runner.ensure_grafted(client)
mark("graft")
rss = []
orig = loop._accumulate
def acc(*a, **k):
    r = orig(*a, **k); rss.append(round(st("VmRSS"))); return r
loop._accumulate = acc
if tm:
    with TensorMemory() as m:
        runner.train(client, 1, initial)
    print("tensor peak MB", m.peak/1e6)
else:
    runner.train(client, 1, initial)
mark("train")
print("rss per step", rss)
if "trim" in sys.argv[2:]:
    ctypes.CDLL("libc.so.6").malloc_trim(0); print("after malloc_trim", round(st("VmRSS")))
