"""Your answers to docs/exercises.md: this file is your hand-in.

Replace each `raise NotImplementedError` (or `None`) by your answer; keep the names and the
parameters. Grade it with `python -m pytest -m exercises` (one exercise: add `-k exercise_8`).
The checks run your functions in a separate process on inputs they choose and judge the
returned values: return plain numbers, lists, tuples, dicts, torch tensors or NumPy arrays
(floating-point results in float64, the inputs' dtype). You may import torch, numpy and the
project's `vortex` module; a hand-in may not use inspect, sys._getframe, os._exit, subprocess,
ctypes, __main__, test_vortex or the teachers' key (docs/exercises.md, "How they are graded").
"""

# 1 (3.2, 3.3): u, the number of descriptors Module A with k = 13 reads at one pixel of an
# unbounded map (an int, counted by hand).
EXERCISE_1_U = None

def exercise_2_box_average_9(x, count_include_pad):
    """2 (3.4): the 9 x 9 stride-1 average of x (N, C, H, W), same size as x, as a cascade of two
    F.conv2d (3 x 3, then 3 x 3 at dilation 3); count_include_pad as in F.avg_pool2d."""
    raise NotImplementedError

def exercise_3_max_pool(x, pools):
    """3 (3.3): {k: x max-pooled over k x k windows, stride 1, same size} for k in pools
    (k = 1: x itself); a drop-in for ContextModule.pool."""
    raise NotImplementedError

# 3 (3.3): which pooling learns each cue better, {"mean": "avg" or "max", "max": ...}
EXERCISE_3_WINNERS = None

def exercise_4_sync_batch_stats(xs):
    """4 (4.1): xs is one (N_i, C, H, W) batch per rank; return the per-channel (mean, biased
    variance) that synchronised batch norm normalises with, from per-rank sums only."""
    raise NotImplementedError

# 5 (1): the side, in pixels, of the theoretical receptive field of one output pixel of
# vortex.ResNet(18, 8) (multi-grid rates in layer4) on an 801 x 801 input (eval mode).
EXERCISE_5_RF = None

def exercise_6_balanced_digits(v, n):
    """6 (3.4): the n base-3 digits of v in {-1, 0, 1}, least significant first
    (sum(d * 3 ** i) == v), for |v| <= (3 ** n - 1) // 2."""
    raise NotImplementedError

# 6 (3.4): the side of the square that the five-branch vortex (1, 3, 9, 27, 81) tiles.
EXERCISE_6_SIDE = None

def exercise_7_ring_coverage(pools, kernels, dilations, d):
    """7 (3.2-3.4): the fraction of the 8 d offsets at Chebyshev distance d (the one offset 0 for
    d = 0) that a module with these branches reads on an unbounded map."""
    raise NotImplementedError

def exercise_8_utilization_at(pools, kernels, dilations, h, w, i, j):
    """8 (3.2, Eq. 1): how many positions of an h x w map the branches read for output pixel
    (i, j), without autograd."""
    raise NotImplementedError

def exercise_9_module_a_u(k):
    """9 (3.3): u of Module A(k) on an unbounded map, in closed form, for odd k = 1 .. 23."""
    raise NotImplementedError

# 9 (3.3): the smallest odd k for which A(k) reads every position of a 65 x 65 map at its centre.
EXERCISE_9_SMALLEST_K = None

def exercise_10_vortex(b, n):
    """10 (3.4): (pools, kernels, dilations) of the base-b vortex with n branches: branch 0 a
    1 x 1 convolution, branch i >= 1 b**i x b**i windows tiling a b**(i+1) square."""
    raise NotImplementedError

def exercise_10_gradient(pools, kernels, dilations, weights):
    """10 (3.4): the gradient of the sum of the branches' outputs at the centre pixel (one input
    and one output channel, weights[i] the n_i x n_i kernel of branch i, a NumPy array) with
    respect to each input offset, as a (2R+1) x (2R+1) array, R the module's reach; without
    autograd."""
    raise NotImplementedError
