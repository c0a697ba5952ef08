"""imgclf: an image-classifier pipeline library (no orchestration imports)."""

import os

# How long torch's idle OpenMP threads spin before they sleep (libgomp, the OpenMP of torch's Linux wheels). Its
# default, about 300,000 spins, takes the cores to be this process's alone: two default-CNN trainings (a thread
# per core each) on one 2-core machine took 94-227 s for one epoch each, against 20 s for one alone, the spinning
# threads of each holding the cores the other needed. Spin counts measured (bench/concurrency.py --wait-policy):
# 30,000: alone 0.98x, two at once 79 s; 10,000: alone 1.04x, 54 s; 1,000: alone 1.15x, 41 s; OMP_WAIT_POLICY=PASSIVE:
# alone 1.25x, 40 s. 10,000 keeps one training's speed and most of a shared machine's. libgomp reads it once, as
# torch loads it, so it is set here, before any torch import; a spin count or wait policy the user set wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
