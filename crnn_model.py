"""The CNN-RNN model: a ResNet's last map read by a bidirectional RNN, attention-pooled, a head
per task; its checkpoints read back; where it looked (attention maps, Grad-CAM).

Holds no data reading, no training loop and no command line (crnn_data.py, crnn_train.py,
crnn.py); the backbone, device and precision are nets.py's.

    import crnn_model
    model, ckpt = crnn_model.load_checkpoint("runs/demo/best.pt")   # eval mode, on the CPU
    maps = crnn_model.attention_maps(model, x)     # (B, H, W), each map summing to 1
    cams, classes = crnn_model.grad_cam(model, x, "style")
"""

import os

import torch
from torch import nn

import nets
from files import UserError, one_line

ARCH = "crnn-v1"  # stored in every checkpoint; load_checkpoint refuses anything else
# ----------------------------------------------------------------------------- model

class CRNN(nn.Module):
    """ResNet map -> 1x1 conv -> bidirectional RNN over the H*W positions in raster order ->
    attention pooling -> one linear head per task. n_classes: {task: number of classes}."""

    def __init__(self, n_classes, backbone="resnet50", weights="none", hidden=256, rnn="lstm",
                 dropout=0.2):
        super().__init__()
        if isinstance(backbone, nn.Module):  # any trunk of (B, C, H, W) maps (tests: tiny)
            self.backbone, channels = backbone, nets.trunk_channels(backbone)
        else:
            self.backbone, channels = nets.backbone(backbone, weights)  # C = 512 or 2048
        self.proj = nn.Conv2d(channels, hidden, 1)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](hidden, hidden, batch_first=True,
                                                         bidirectional=True)
        self.dim = 2 * hidden  # forward + backward states
        self.score = nn.Linear(self.dim, 1)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(self.dim, n) for t, n in n_classes.items()})

    def attend(self, fmap):
        """(B, C, H, W) backbone features -> (attention weights (B, H*W) over the grid cells in
        raster order, each row summing to 1; RNN states (B, H*W, D))."""
        seq = self.proj(fmap).flatten(2).transpose(1, 2)  # (B, H*W, hidden), raster order
        if seq.device.type == "cpu":  # oneDNN's bf16 LSTM trained 1.7x slower than fp32
            with torch.autocast("cpu", enabled=False):
                h, _ = self.rnn(seq.float())  # (B, H*W, D)
        else:
            h, _ = self.rnn(seq)
        return torch.softmax(self.score(h).squeeze(-1).float(), dim=1), h

    def pool(self, fmap):
        """(B, C, H, W) backbone features -> (B, D) attention-weighted mean of RNN states."""
        a, h = self.attend(fmap)
        return torch.einsum("bn,bnd->bd", a, h.float())

    def classify(self, fmap):
        """Backbone features -> {task: logits}; --freeze-backbone trains this from the cache."""
        z = self.drop(self.pool(fmap))
        return {t: head(z) for t, head in self.heads.items()}

    def embed(self, x):
        """Images (B, 3, S, S) -> (B, D) pooled vectors before the heads (retrieval by style)."""
        return self.pool(self.backbone(x))

    def forward(self, x):
        return self.classify(self.backbone(x))


class Inference(nn.Module):
    """A trained CRNN for inference (--eval, --predict, retrieve.py --ckpt): its backbone
    BN-folded and in `precision` (nets.for_inference), the RNN, attention and heads in fp32 as
    trained. model itself stays as it was (Grad-CAM and attention maps hook its backbone)."""

    def __init__(self, model, precision="fp32"):
        super().__init__()
        self.model, self.dtype = model, nets.PRECISIONS[precision]
        self.body = nets.for_inference(model.backbone, precision)
        self.heads = model.heads  # predict_probs names the tasks by them

    def fmap(self, x):
        return self.body(x.to(self.dtype)).float()

    def embed(self, x):
        return self.model.pool(self.fmap(x))

    def forward(self, x):
        return self.model.classify(self.fmap(x))


def inference_model(model, device, enabled=True):
    """Inference(model) in the precision nets.inference_precision picks (printed once)."""
    name, why = nets.inference_precision(device, enabled)
    nets.say_precision(name, why)
    return Inference(model, name).to(device).eval()


def build_model(a, classes, weights="none"):
    """CRNN from a plain args dict and {task: [class names]} (as stored in checkpoints)."""
    return CRNN({t: len(c) for t, c in classes.items()}, a["backbone"], weights, a["hidden"],
                a["rnn"], a["dropout"])


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (train one with --train)")
    try:  # checkpoints are untrusted files: tensors and plain containers only
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's text would suggest weights_only=False: never, for such a file
        raise UserError(f"cannot read checkpoint {path}: not a file that torch.save wrote, or "
                        "one cut short or damaged") from None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH:
        raise UserError(f"{path} is not a crnn.py checkpoint (another architecture or format)")
    if "dev" not in ckpt and "val" in ckpt:  # the dev scores' name before issue 22
        ckpt["dev"] = ckpt.pop("val")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict); no pretrained download needed."""
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["args"], ckpt["classes"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: checkpoint does not match crnn.py's model ({one_line(e)})") \
            from None
    model.to(memory_format=torch.channels_last)  # the convolutions: backbone and projection
    print(model_line(ckpt, path))
    return model.to(device).eval(), ckpt


def model_line(ckpt, path):
    a = ckpt["args"]
    return (f"model: {a['backbone']} + {a['rnn']} {a['hidden']}, {a['img_size']} px, from {path} "
            f"(epoch {ckpt.get('epoch')})")


def to_device(x, device):
    """x on device in channels_last, float. Asynchronous only on CUDA (from pinned memory): a
    non_blocking CPU-to-MPS copy can read its source after the loop has dropped it, silently
    wrong values (pytorch/pytorch#139550, #189690, open in 2026)."""
    return x.to(device, non_blocking=device.type == "cuda",
                memory_format=torch.channels_last).float()


# ----------------------------------------------------------------------- where the model looked

def seen(x):
    """(B, 3, S, S) normalised batch -> (B, S, S, 3) uint8: the crops the model saw."""
    mean = torch.tensor(nets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(nets.IMAGENET_STD).view(1, 3, 1, 1)
    x = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_maps(model, x):
    """(B, H, W) numpy: the attention pooling's weight on each cell of the backbone's grid, each
    map summing to 1. Cell (i, j) stands for the crop's pixels [i S/H, (i+1) S/H) x
    [j S/W, (j+1) S/W) (its receptive field is wider)."""
    fmap = model.backbone(x)
    a, _ = model.attend(fmap)
    return a.reshape(len(x), *fmap.shape[2:]).cpu().numpy()


def last_block(model):
    """Where Grad-CAM reads: the backbone's last block (ResNet: layer4[-1]; its output is the
    map that the RNN reads)."""
    last = list(model.backbone.children())[-1]
    return last[-1] if isinstance(last, nn.Sequential) and len(last) else last


def grad_cam(model, x, task, classes=None):
    """(maps (B, h, w) numpy >= 0, classes (B,) tensor): Grad-CAM (Selvaraju et al. 2017) of each
    image's class for `task`, the predicted one when classes is None. map = ReLU(sum_k alpha_k
    A_k): A is the last block's output, alpha_k the grid mean of d logit / d A_k. Plain hooks: a
    forward hook keeps A and hangs a tensor hook on it for the gradient (full backward hooks
    fail on ResNet's in-place ReLU). Call with the model in eval mode."""
    got = {}

    def keep(module, inputs, out):
        got["A"] = out
        out.register_hook(lambda g: got.update(G=g))

    handle = last_block(model).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a path for gradients through a frozen trunk
            logits = model(x)[task].float()
            classes = logits.argmax(1) if classes is None else classes.to(logits.device)
            # images are independent in eval mode (BatchNorm uses running stats): one backward
            logits.gather(1, classes.view(-1, 1)).sum().backward(inputs=[x])
    finally:
        handle.remove()
    A, G = got["A"].detach().float(), got["G"].float()
    return torch.relu((G.mean((2, 3), keepdim=True) * A).sum(1)).cpu().numpy(), classes.cpu()
