"""Peak RSS of the SST-2 job after setup, 15 steps and one evaluation, and what setup keeps resident
(VmRSS after it) (README: what the trunk saves).

    python bench/trunk_rss_probe.py [PREFIX_LAYERS [TRUNK_CACHE]]    # e.g. 4-6 disk
"""
import resource, sys, tempfile, torch
torch.set_num_threads(1)
from ptv2_kernels.train import TrainConfig
from ptv2_kernels.train.trainer import Run, epoch_batches
from ptv2_kernels.train.distributed import DistEnv
extra = dict(zip(("prefix_layers", "trunk_cache"), sys.argv[1:]))
cfg = TrainConfig(task="sst2", prefix_len=16, lr=1e-2, batch_size=32, epochs=3, max_length=64, max_train_samples=4000,
                  data_dir="/work/shared/datasets", output_dir=tempfile.mkdtemp() + "/r", progress=False, threads=1, **extra)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
r = Run(cfg.resolved(), DistEnv(), log=lambda s: None); r.setup(); a = rss()
kept = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0]) // 1024
r.model.train()
for b in epoch_batches(r.n_train, 32, 0, 0)[:15]:
    r.step(b)
b_ = rss()
r.evaluate(0.1)
print(sys.argv[1:] or ["all"], "setup", a, f"MB (keeps {kept} MB); 15 steps", b_, "MB; + evaluation", rss(), "MB")
