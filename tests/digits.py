"""A small CNN with BatchNorm trained in seconds on scikit-learn's bundled 8x8 digits (real data a
package ships), exported to ONNX unfolded, and the kinds of damage its BN statistics suffer in
practice: reset, pruned channels, weights averaged from two runs, statistics from batch-size-2
fine-tuning.

Training is deterministic (one thread, torch's deterministic algorithms, fixed seeds), yet the
trained weights may still differ in their last bits between CPUs (another SIMD width sums in
another order). So no test judges a trained number against a margin: each compares foldkit with an
independent float64 computation on the same model (:func:`precise_bn`, :func:`agrees`).
"""

from __future__ import annotations

import copy

import numpy as np

SEED = 0


def digits():
    """(x_train, y_train, x_test, y_test) as float32 NCHW in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(SEED).permutation(len(y))
    cut = 1300
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def net(dropout=0.0):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class _deterministic:
    """One thread and deterministic algorithms while training: the same float reductions whatever
    the machine's core count (the caller's settings are restored)."""

    def __enter__(self):
        import torch

        self.threads, self.det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.det)


def train(model, x, y, epochs=12, batch=64, seed=SEED, lr=0.05):
    with _deterministic():
        return _train(model, x, y, epochs, batch, seed, lr)


def _train(model, x, y, epochs, batch, seed, lr):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        if epoch == epochs - 4:  # a calmer end: the running statistics settle with the weights
            for g in opt.param_groups:
                g["lr"] = lr / 10
        perm = torch.randperm(len(yt))
        for k in range(0, len(yt), batch):
            i = perm[k:k + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def trained(dropout=0.0, seed=SEED):
    import torch

    x, y, _, _ = digits()
    torch.manual_seed(seed)  # the initial weights too: the same model every time
    return train(net(dropout), x, y, seed=seed)


def precise_bn(model, x, batch):
    """An independent float64 precise-BN recalibration of ``model`` (Wu & Johnson 2021), written
    here with torch's own BatchNorm: a float64 copy in which every BN normalizes with its batch's
    statistics (running statistics frozen; Dropout and every other module in inference mode) over
    consecutive slices of ``batch`` samples (or the [a, b) slices listed in ``batch``), then takes
    the population mean and variance of all its inputs. Returns the float64 copy in eval mode."""
    import torch

    m = copy.deepcopy(model).double().eval()
    bns = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    seen = {b: [] for b in bns}
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen[mod].append(
        np.moveaxis(a[0].numpy(), 1, 0).reshape(a[0].shape[1], -1))) for b in bns]
    for b in bns:
        b.train()
        b.momentum = 0.0
    bounds = batch if isinstance(batch, (list, tuple)) else [(k, k + batch) for k in range(0, len(x), batch)]
    with torch.no_grad():
        for a, b in bounds:
            m(torch.from_numpy(np.asarray(x[a:b], np.float64)))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for b in bns:
            v = np.concatenate(seen[b], axis=1)
            b.running_mean.copy_(torch.from_numpy(v.mean(axis=1)))
            b.running_var.copy_(torch.from_numpy(v.var(axis=1)))
    return m.eval()


def float64(model):
    """A float64 copy of ``model`` in eval mode (``Module.double()`` converts in place)."""
    return copy.deepcopy(model).double().eval()


def logits(model, x) -> np.ndarray:
    """``model``'s outputs on ``x`` in the model's own precision, as float64."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x)).to(dtype)).double().numpy()


def agrees(pred: np.ndarray, ref_logits: np.ndarray, y: np.ndarray) -> dict:
    """Compare predicted classes with a float64 reference's logits. A sample whose reference top-2
    logits are within 1e-4 of its logit range is a near-tie that float32 rounding may flip either way;
    every other prediction must equal the reference's. Returns the accuracies and the counts."""
    ref_pred = ref_logits.argmax(axis=1)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    spread = np.ptp(ref_logits, axis=1) + 1e-30
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * spread
    disagree = int(np.sum((pred != ref_pred) & clear))
    return {"disagree": disagree, "near_ties": int(np.sum(~clear)), "acc": float(np.mean(pred == y)),
            "ref_acc": float(np.mean(ref_pred == y)), "allowed": int(np.sum(~clear)) / len(y)}


def damaged(model, kind: str, seed=SEED):
    """A copy of ``model`` with realistically broken BN statistics."""
    import torch

    m = copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    if kind == "reset":  # statistics never updated (re-initialized, or trained with track_running_stats off)
        for b in bns:
            b.reset_running_stats()
    elif kind == "pruned":  # magnitude pruning, as pruners do: the smallest 60% of the second conv's
        # weights zeroed; the BN statistics after it are stale
        with torch.no_grad():
            w = m[4].weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.6 * w.numel())).values] = 0
    elif kind == "averaged":  # SWA/EMA-style: weights averaged along the training run, statistics not
        x, y, _, _ = digits()
        later = train(copy.deepcopy(model), x, y, epochs=5, seed=seed + 1, lr=0.3)
        with torch.no_grad():
            for p, q in zip(m.parameters(), later.parameters()):
                p.copy_((p + q) / 2)
    elif kind == "batch2":  # fine-tuned with per-GPU batches of 2: running statistics from tiny batches
        x, y, _, _ = digits()
        g = torch.Generator().manual_seed(seed)
        m.train()
        for b in bns:
            b.momentum = 0.5
        with torch.no_grad(), _deterministic():
            for _ in range(20):
                i = torch.randint(0, len(y), (2,), generator=g)
                m(torch.from_numpy(x)[i] * 3.0)  # and a shifted input distribution
        m.eval()
    else:
        raise ValueError(kind)
    return m.eval()


def to_onnx(model, path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
    return path


def save_npz(path, x, y=None):
    if y is None:
        np.savez(path, image=x)
    else:
        np.savez(path, image=x, label=y)
    return path
