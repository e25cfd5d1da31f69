"""Model plumbing that crnn.py and retrieve.py share: device, precision, allocator, the one
backbone loader, BatchNorm folding, image-to-tensor transforms, torch.distributed helpers and
per-rank parts, the one batched embedding loop into a .npy, the runtime flags.

Holds no file or image reading (files.py), no data sets (data.py), no drawing (pages.py), no
CNN-RNN and no FAISS code.

    import nets
    device = nets.pick_device(None)                 # prints `device: cpu` once
    trunk, channels = nets.backbone("resnet50", "imagenet")   # (B, 2048, H/32, W/32)
    device = nets.init_distributed(device)          # under torchrun: joins the process group
"""

import argparse
import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import sys
import urllib.error

import numpy as np
import torch
from torch import nn

import files
from files import UserError, one_line

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- device

def mps_available():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(flag=None):
    """An explicit --device wins (checked: a device this machine lacks is one line, not a
    traceback at the first tensor); else cuda, then mps, then cpu. Prints the choice once.
    cuda:N also becomes torch's current GPU: what opens a context without naming a device
    (the DataLoader's pin-memory thread, cuDNN and FAISS handles) would otherwise open one on
    GPU 0 as well, holding memory there. (Under torchrun init_distributed sets cuda:LOCAL_RANK.)
    First, once: the torch/torchvision pair (check_torchvision), every command's start-up."""
    check_torchvision()
    if flag:
        device = check_device(flag)
        if device.type == "cuda" and device.index is not None and world() == 1:
            torch.cuda.set_device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif mps_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    print(f"device: {device}")
    return device


# torch 2.N is built with torchvision 0.(N + 15): 2.0-0.15, 2.5-0.20, 2.7-0.22, 2.14-0.29
# (the PyTorch wiki's "PyTorch Versions" table). Another pair, easy to get by installing one of
# them from PyTorch's CPU index and the other from PyPI, fails inside torchvision's import.
CPU_INSTALL = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def torchvision_for(torch_version):
    """'0.N' of the torchvision that belongs with torch_version ('2.5.1+cpu' -> '0.20'); None
    for a torch before 2.0 or a version that does not parse."""
    try:
        major, minor = (int(v) for v in torch_version.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    return f"0.{minor + 15}" if major == 2 else None


def pair_line(torch_version, tv_version, why):
    """One line: the pair found, the pair that belongs together, the command that installs it."""
    want = torchvision_for(torch_version)
    pair = f"torchvision {want}.x belongs with it" if want else "install the pair together"
    return (f"torch {torch_version} with torchvision {tv_version} ({why}): {pair}; install "
            f"both at once: {CPU_INSTALL} (CPU), or pip install torch torchvision (CUDA)")


_TORCHVISION_OK = []  # checked once per process


def check_torchvision():
    """Import torchvision once; a pair that does not belong together is one UserError line (a
    mismatch otherwise ends every command in a 20-line `operator torchvision::nms does not
    exist` traceback), or one warning line when it still imports."""
    if _TORCHVISION_OK:
        return
    tv = "not installed"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        tv = importlib.metadata.version("torchvision")
    try:
        importlib.import_module("torchvision")
    except (ImportError, RuntimeError, OSError, AttributeError) as e:
        raise UserError(pair_line(torch.__version__, tv, f"torchvision fails to import: "
                                  f"{one_line(e)[:80]}")) from None
    want = torchvision_for(torch.__version__)
    if want and not tv.startswith(want + "."):
        print("warning: " + pair_line(torch.__version__, tv, "not built for each other"))
    _TORCHVISION_OK.append(True)


def check_device(flag):
    """torch.device(flag) for cpu, cuda, cuda:N or mps that this machine has, else UserError."""
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UserError(f"--device {flag}: not a device name (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {flag}: this machine has no CUDA GPU that torch can use "
                            f"(torch {torch.__version__}; a CPU-only build, or no driver)")
        if device.index is not None and device.index >= n:
            raise UserError(f"--device {flag}: there are {n} CUDA GPUs (cuda:0 to cuda:{n - 1})")
    elif device.type == "mps" and not mps_available():
        raise UserError(f"--device {flag}: MPS (Apple GPU) is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {flag}: ArtExtract runs on cpu, cuda or mps")
    return device


def transparent_hugepages():
    """The kernel's THP mode (always, madvise or never), or None where it cannot be read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def malloc_tuning_wanted():
    """(yes or no, why). ARTEXTRACT_MALLOC_TUNING=1 or 0 decides; else only on Linux where
    transparent huge pages are not 'always'.

    glibc hands each large freed block (the activations of a CNN batch) back with munmap, and
    the next batch faults it in again 4 KiB at a time: measured on a 2-core AMD EPYC (THP
    madvise), ResNet50 fp32 batch 32: 1.78 M page faults for 4 batches untuned, 0.29 M tuned,
    13 -> 17 img/s. With THP 'always' the same blocks come back in 2 MiB pages (0.19 M faults
    untuned), and blocks kept in the brk heap instead lose their huge-page alignment: there the
    tuning was measured to cost 12% (an AMX Xeon, 53.7 -> 47.5 img/s), so it is left off."""
    env = os.environ.get("ARTEXTRACT_MALLOC_TUNING")
    if env == "0":
        return False, "off (ARTEXTRACT_MALLOC_TUNING=0)"
    if env == "1":
        return True, "ARTEXTRACT_MALLOC_TUNING=1"
    if not sys.platform.startswith("linux"):
        return False, "not Linux"
    thp = transparent_hugepages()
    if thp == "always":
        return False, "off: transparent huge pages are 'always', freed blocks come back cheaply"
    return True, f"transparent huge pages '{thp}'"


@functools.lru_cache(maxsize=1)
def tune_malloc():
    """Keep freed memory in the process instead of handing it back to the OS after every batch,
    where that helps (malloc_tuning_wanted); prints what it did, once per process.

    M_MMAP_MAX=0 serves every block from the heap and a huge M_TRIM_THRESHOLD never shrinks
    it, the runtime equivalent of GLIBC_TUNABLES mmap/trim thresholds (bench.py measures both
    sides). Costs: peak RSS stays reserved. Returns True when applied (glibc only)."""
    want, why = malloc_tuning_wanted()
    ok = want and mallopt_keep_freed()
    print(f"malloc: freed memory kept in the process ({why}; ARTEXTRACT_MALLOC_TUNING=0 turns "
          "it off)" if ok else f"malloc: glibc's defaults ({why if not want else 'no glibc'})")
    return ok


def mallopt_keep_freed():
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        return ok and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


def add_runtime_flags(parser, amp_help, device_help=""):
    """The runtime flags both scripts take, in a "runtime" group (returned, for a script's own):
    --device (pick_device), --workers (DataLoader processes) and --amp (choose_precision;
    amp_help: what it changes in this script). device_help: more on --device here."""
    r = parser.add_argument_group("runtime")
    r.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda, mps, then cpu)"
                   + device_help)
    r.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images (0: in the main process)")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help=amp_help)
    return r


# ----------------------------------------------------------------------------- torch.distributed
# torchrun starts one process per GPU (or per share of the CPU) and tells each its RANK (0..N-1
# over all nodes), LOCAL_RANK (its GPU on this node) and WORLD_SIZE (N) in the environment.
# Without them (plain `python crnn.py`, a notebook) every helper below is a no-op for one
# process, so the scripts run the same code either way.

def rank():
    return int(os.environ.get("RANK", "0"))


def world():
    """Processes in the run: WORLD_SIZE under torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main():
    """Rank 0: the one process that prints and writes results (checkpoints, index, logs)."""
    return rank() == 0


def main_prints_only():
    """Under torchrun, every rank but 0 prints to /dev/null: one set of progress lines and
    results instead of N interleaved ones. stderr (errors) stays."""
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # for the life of the process


def init_distributed(device, hours=None):
    """Under torchrun with WORLD_SIZE > 1: joins the process group, nccl on CUDA (this rank's
    GPU: cuda:LOCAL_RANK, whatever --device named) and gloo on the CPU; returns the device this
    rank uses. Else returns device unchanged. hours: how long a collective may wait for the
    slowest rank (torch's default is 10 min for nccl, 30 for gloo)."""
    if world() == 1:
        return device
    import torch.distributed as dist
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"torchrun runs on cuda or cpu, not {device.type}: pass --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_gpu())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(hours=hours)} if hours else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
        print(f"torchrun: {world()} processes, backend {dist.get_backend()}")
    return device


def local_gpu():
    """LOCAL_RANK, the GPU this rank uses, checked against the GPUs there are: more ranks on a
    node than GPUs is one line, not an invalid-device error deep in torch or nccl."""
    local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= n:
        raise UserError(f"torchrun rank {rank()}: LOCAL_RANK {local} but this machine has {n} "
                        f"CUDA GPU{'s' if n != 1 else ''}: start at most --nproc-per-node {n} "
                        "(one process per GPU), or pass --device cpu")
    return local


def close_distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_part(n, r=None, w=None):
    """(start, stop) of rank r's contiguous part of n items (default: this rank's): parts
    differ in size by at most one and, in rank order, cover 0..n-1."""
    r, w = rank() if r is None else r, world() if w is None else w
    return n * r // w, n * (r + 1) // w


def barrier():
    if world() > 1:
        import torch.distributed as dist
        dist.barrier()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: lists, dicts, numpy
    arrays); [obj] for one process. Also a barrier: it returns once every rank has sent."""
    if world() == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values):
    """Element-wise sum over the ranks, as float64 numpy: of a list of numbers (one small
    all_reduce), or of a tensor, reduced where it lies (a loss on the GPU: one copy to the
    host after the reduction instead of .item() before it and a copy after: one wait for the
    GPU per call, not two); the values themselves for one process."""
    if torch.is_tensor(values):
        t = values.detach().reshape(-1).to(torch.float64, copy=True)
    else:
        t = torch.from_numpy(np.array(values, dtype=np.float64))
    if world() == 1:
        return t.cpu().numpy()
    import torch.distributed as dist
    if dist.get_backend() == "nccl":  # nccl reduces GPU tensors only
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().numpy()


# ----------------------------------------------------------------------------- per-rank parts
# Work split over torchrun ranks (crnn's feature cache, retrieve's embeddings) is written in
# parts: rank R writes the rows of its part (rank_part) to STEM.part-R-of-W.npy, then the
# record of what they are to STEM.part-R-of-W.json, last and by rename, so that a json marks a
# finished part: the same command after a crash keeps it (read_part). Rank 0 then joins the
# parts in rank order into one .npy (join_parts) and removes them (remove_parts).

def part_stem(stem, r=None):
    """STEM.part-R-of-W, rank r's part (default: this rank's) of the world() ranks' work."""
    return f"{stem}.part-{rank() if r is None else r}-of-{world()}"


def read_part(stem, r=None):
    """(record, rows memory-mapped) of rank r's finished part, or None when there is none to
    trust: no json (the part was not finished), or rows that do not load or are not its n."""
    p = part_stem(stem, r)
    try:
        with open(p + ".json", encoding="utf-8") as f:
            rec = json.load(f)
        rows = np.load(p + ".npy", mmap_mode="r")
        ok = isinstance(rec, dict) and rec["n"] == len(rows)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (rec, rows) if ok else None


def finish_part(stem, record):
    """Mark this rank's part (its rows written) finished: its record, with n, the row count."""
    files.atomic_write(part_stem(stem) + ".json", json.dumps(record))


def join_parts(stem, dst):
    """Rank 0, once every rank finished: the parts' rows, in rank order, into the .npy dst
    (files.copy_rows: bounded memory, temp + rename). Returns the records in rank order."""
    got = [read_part(stem, r) for r in range(world())]
    if None in got:
        raise UserError(f"{part_stem(stem, got.index(None))}: rank {got.index(None)}'s part "
                        "is missing or unreadable")
    files.copy_rows(dst, [(part_stem(stem, r) + ".npy", rec["n"])
                          for r, (rec, _) in enumerate(got)])
    return [rec for rec, _ in got]


def remove_parts(stem):
    for r in range(world()):
        for ext in (".npy", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(part_stem(stem, r) + ext)


# ----------------------------------------------------------------------------- embedding loop

def rows_to_npy(batches, fn, n, path, dtype, shape, label, empty=None, temp=True):
    """The one batched embedding loop: fn(x) -> numpy rows (B, *shape) for each (x, idx,
    failed) batch of images (x None when none of the batch decoded; idx: their positions in
    0..n-1), written at those positions of a new (n, *shape) .npy of dtype at path, memory-
    mapped (never all in RAM), whatever order the batches come in; through a temp file renamed
    at the end: an interrupted run leaves no file. Rows of images that failed stay zeros.
    Returns (ok (n,) bool, failed [(position, why)]). empty: raised as a UserError, and no file
    written, when no image decoded. temp False: path is itself a temp file of the caller's."""
    ok, failed, prog = np.zeros(n, bool), [], files.Progress(n, label)
    with files.replaced(path, suffix=".tmp.npy") if temp else removed_on_error(path) as tmp:
        out = files.open_memmap(tmp, dtype, (n, *shape))  # reserved: ENOSPC, no SIGBUS
        for x, idx, bad in batches:
            failed += bad
            if x is not None:
                out[idx.numpy()] = fn(x)
                ok[idx.numpy()] = True
            prog.update(len(bad) + (0 if x is None else len(idx)),
                        f"{len(failed)} unreadable" if failed else "")
        if empty and not ok.any():
            raise UserError(empty)
        out.flush()
        del out  # unmapped before the rename
    return ok, failed


@contextlib.contextmanager
def removed_on_error(path):
    try:
        yield path
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise


# ----------------------------------------------------------------------------- precision

def cpu_bf16_is_fast():
    """True where bf16 matrix units out-run fp32 FMAs: Intel AMX, or AMD Zen 4+ (AVX512-BF16).

    Intel's AVX512-BF16 without AMX (Cooper Lake, or a VM that hides AMX) issues VDPBF16PS on
    one port: 32 bf16 pairs = 64 flop/cycle, the same as two fp32 FMA ports, plus conversions.
    Measured on such a CPU: ResNet50 at batch 32 ran 18 img/s in bf16, 28 img/s in fp32.
    """
    info = cpu_flags_text()
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))
    return "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in info)


def mkldnn_bf16():
    try:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(device, enabled=True):
    """(weights, autocast, why): the one rule for training and inference on device.

    weights: what inference runs in (embedding, --eval, --predict, the frozen feature cache),
    the model converted once: bf16 weights ran a ResNet50 1.8x faster than autocast on an AMX
    Xeon, agreeing with fp32 to a mean cosine of 0.99999. autocast: training's dtype (None:
    fp32); fp16 trains with a GradScaler (crnn.make_fit), bf16 needs none (fp32's range).
    CUDA by compute capability, not torch.cuda.is_bf16_supported(), which is True on a T4
    (sm 7.5) because torch emulates bf16 there (slow, and some cuDNN kernels refuse it):
    bf16 from sm 8.0 (A100, L4, H100), fp16 below (T4, V100). CPUs with fast bf16 (AMX,
    Zen 4): bf16 both; other CPUs and mps: fp32. enabled False (--no-amp): fp32 both."""
    if not enabled:
        return "fp32", None, "--no-amp"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return "bf16", torch.bfloat16, f"CUDA sm {major}.{minor}: bf16 hardware"
        return "fp16", torch.float16, f"CUDA sm {major}.{minor}: no bf16 hardware, fp16"
    if device.type == "cpu" and cpu_bf16_is_fast() and mkldnn_bf16():
        return "bf16", torch.bfloat16, "AMX" if "amx" in cpu_flags_text() else "AVX512-BF16"
    return "fp32", None, f"{device.type}: no faster precision here"


def inference_precision(device, enabled=True):
    """(weights name, why) of choose_precision: what inference runs in."""
    weights, _, why = choose_precision(device, enabled)
    return weights, why


def autocast_dtype(device, enabled=True):
    """Training's autocast dtype of choose_precision, or None (fp32)."""
    return choose_precision(device, enabled)[1]


def precision_line(device, enabled=True):
    """What choose_precision picked, for people: 'bf16 weights, training: bf16 autocast (why)'."""
    weights, amp, why = choose_precision(device, enabled)
    train = {None: "fp32", torch.bfloat16: "bf16 autocast",
             torch.float16: "fp16 autocast + GradScaler"}[amp]
    return f"{weights} weights, training: {train} ({why})"


@functools.cache
def say_precision(name, why):
    print(f"precision: {name} weights ({why})")  # once per process and choice


def cpu_flags_text():
    """The start of /proc/cpuinfo (vendor, model and flags of the first core), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def for_inference(module, precision="fp32"):
    """An eval-mode copy with BatchNorm folded (fuse_for_inference), in channels_last, its
    weights in `precision` (fp32, bf16 or fp16). Its input must come in the same dtype."""
    return fuse_for_inference(module).to(PRECISIONS[precision])


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN's deterministic kernels, no autotuner, for the block only: a seeded training run
    repeats on the GPU (closely, not bit for bit: some kernels have no deterministic form), and
    the caller's settings come back after it, so a notebook's later convolutions (embedding,
    other training) keep the fast autotuned ones."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def autocast(device, dtype):
    """torch.autocast for dtype on device, or a null context when dtype is None.

    A null context rather than autocast(enabled=False): torch 2.1-2.4 refuse to enter any
    autocast on mps, even a disabled one."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- backbone

def read_state_dict(path):
    """A backbone's state_dict from a local file (--weights PATH), tensors only."""
    return files.read_state_dict(path, "--weights", "imagenet|none", crnn_checkpoint)


def crnn_checkpoint(state):
    """Why a loadable --weights file is refused: a crnn.py checkpoint (None otherwise)."""
    if isinstance(state, dict) and "model" in state and "args" in state:
        return ("is a crnn.py checkpoint, not a backbone state_dict (retrieve.py embeds with it "
                "as --ckpt)")
    return None


def imagenet_state_dict(name):
    """torchvision's ImageNet weights, downloaded once into torch.hub's cache (~/.cache/torch)."""
    from torchvision import models
    w = models.get_model_weights(name).DEFAULT
    try:  # torch.hub prints 'Downloading: URL to PATH' (once; then it reads its cache)
        return w.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise UserError(f"cannot download the ImageNet weights for {name} ({one_line(e)}); "
                        "offline, use --weights PATH (a torchvision state_dict, e.g. copied "
                        "from another machine's ~/.cache/torch/hub/checkpoints) or --weights "
                        "none (random: crnn.py trains from scratch; for retrieve.py a baseline "
                        "only: search by learned style with --ckpt runs/<data>/best.pt)") from None


def load_weights(net, name, weights):
    """Loads imagenet or a state_dict file into net; any classifier head is left out."""
    state = imagenet_state_dict(name) if weights == "imagenet" else read_state_dict(weights)
    head = ("fc.", "classifier.")  # unused here: a fine-tuned head of any size is fine
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        res = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another architecture
        raise UserError(f"--weights {weights}: not a torchvision {name} state_dict "
                        f"({one_line(e)})") from None
    bad = [k for k in res.missing_keys if not k.startswith(head)] + res.unexpected_keys
    if bad:
        raise UserError(f"--weights {weights}: not a torchvision {name} state_dict ({len(bad)} "
                        f"missing or unexpected keys, e.g. {bad[0]})")


def backbone(name, weights="none", seed=None):
    """(trunk, channels): a torchvision classifier without its global pool and head, giving
    (B, channels, H/32, W/32) maps. weights: imagenet (torchvision download), none (random init)
    or a state_dict PATH. seed: with weights none, the random init comes from this seed, so
    that another process rebuilds the very same model; None draws from torch's global RNG."""
    from torchvision import models
    if name not in models.list_models(module=models):
        raise UserError(f"unknown backbone {name!r} (e.g. resnet18, resnet50, resnet101)")
    rng = contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=[])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        net = models.get_model(name, weights=None)
    if weights != "none":
        load_weights(net, name, weights)
    if hasattr(net, "layer4"):  # ResNet family: the children up to layer4
        names = [n for n, _ in net.named_children()]
        trunk = nn.Sequential(*list(net.children())[:names.index("layer4") + 1])
    elif hasattr(net, "features"):  # VGG, DenseNet, EfficientNet, ConvNeXt, MobileNet
        trunk = net.features
    else:
        raise UserError(f"--backbone {name}: no layer4 or features trunk to pool")
    return trunk, trunk_channels(trunk)


def trunk_channels(trunk):
    """Channels of the trunk's output map, from one tiny forward pass in eval mode."""
    was = trunk.training
    with torch.no_grad():
        c = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    trunk.train(was)
    return int(c)


def fuse_for_inference(module):
    """Fold each BatchNorm into the conv before it (eval only; ~15% off a CPU ResNet forward),
    in channels_last. Only the folding is skipped when torch.fx cannot trace the module."""
    from torch.fx.experimental.optimization import fuse
    try:
        module = fuse(module.eval())  # a copy: the original keeps its BatchNorms
    except Exception:  # a module fx cannot trace: keep the plain one, it is only slower
        pass
    return module.to(memory_format=torch.channels_last)


def can_decode_jpegs():
    """Whether this torchvision decodes JPEGs on the device (torchvision.io, deprecated since
    0.29 in favour of TorchCodec): where it is gone, retrieve.py decodes with PIL instead."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def decode_jpegs(blobs, img_size, device):
    """JPEG files' bytes (uint8 tensors) -> (B, 3, S, S) normalised on device: decoded there
    (nvJPEG on CUDA, in one batched call), turned upright per EXIF, then resized (shorter side,
    antialiased) and centre-cropped as make_transform does with PIL. Raises RuntimeError for a
    JPEG it cannot decode.

    EXIF orientation is read here, on the host, from each file's header: torchvision's CUDA
    decoder drops apply_exif_orientation without a word (decode_jpegs_cuda takes no such
    argument), which embedded phone photos and tagged scans sideways on a GPU only."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF
    turns = [jpeg_orientation(b) for b in blobs]
    try:
        imgs = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    except TypeError:  # torchvision < 0.19: no lists on every device
        imgs = [decode_jpeg(b, mode=ImageReadMode.RGB, device=device) for b in blobs]
    x = torch.stack([TF.center_crop(TF.resize(upright(im, t), img_size, antialias=True),
                                    img_size) for im, t in zip(imgs, turns, strict=True)])
    x = x.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def jpeg_orientation(blob):
    """The EXIF orientation (1-8; 1 upright, also when absent or unreadable) in a JPEG's header:
    the APP1 'Exif' segment's first IFD, tag 0x0112. Reads only header bytes, decodes nothing."""
    head = bytes(blob[:1 << 16].numpy()) if torch.is_tensor(blob) else bytes(blob[:1 << 16])
    at = 2 if head[:2] == b"\xff\xd8" else len(head)
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker, length = head[at + 1], int.from_bytes(head[at + 2:at + 4], "big")
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        seg = head[at + 4:at + 2 + length]
        if marker == 0xE1 and seg[:6] == b"Exif\0\0":
            return tiff_orientation(seg[6:])
        at += 2 + length
    return 1


def tiff_orientation(tiff):
    """Tag 0x0112 of the first IFD of EXIF's TIFF block, else 1."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    n = int.from_bytes(tiff[ifd:ifd + 2], order)
    for e in range(ifd + 2, min(ifd + 2 + 12 * n, len(tiff) - 11), 12):  # 12-byte entries
        if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
            value = int.from_bytes(tiff[e + 8:e + 10], order)  # a SHORT, left-justified
            return value if 1 <= value <= 8 else 1
    return 1


def upright(img, orientation):
    """(C, H, W) as decoded -> as displayed for EXIF orientation 1-8, as PIL's exif_transpose:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise. Views where it can (flips copy)."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(-2, -1)  # 5 is this alone; 6, 7, 8 are it and a flip
    flips = {2: [-1], 3: [-2, -1], 4: [-2], 6: [-1], 7: [-2, -1], 8: [-2]}.get(orientation)
    return img.flip(flips) if flips else img


def make_transform(img_size, train=False):
    """PIL -> normalised tensor: shorter side to img_size, then a centre (or random) crop."""
    from torchvision import transforms as T
    if train:
        aug = [T.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True),
               T.RandomHorizontalFlip()]
    else:
        aug = [T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
    return T.Compose([*aug, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

