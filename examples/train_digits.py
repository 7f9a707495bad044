"""Softmax vs ArcFace vs SphereFace on scikit-learn's handwritten digits, with 2-D embeddings.

    python examples/train_digits.py [--quick] [--out DIR]

Trains the same small network (an MLP 64 -> 64 -> 64 -> 2 on the 8 x 8 digit images of
``sklearn.datasets.load_digits``, which ship inside scikit-learn: nothing is downloaded)
three times from the same initialisation, with three heads on the 2-D embedding:

* ``softmax``:    a plain ``nn.Linear(2, 10)`` + cross-entropy;
* ``arcface``:    ``margin_ops.ArcFace``;
* ``sphereface``: ``margin_ops.SphereFace`` with its λ annealing.

Two dimensions are enough for ten classes and make the geometry visible: the margin
losses pack each class into a narrow arc around its weight direction, softmax only needs
the classes to be separable. Writes to DIR (default ``examples-out/``):

* ``digits_embeddings.png``: the normalized test embeddings (angles on the unit circle,
  coloured by class) and the class-weight directions, one panel per loss;
* ``digits_curves.png``: training loss and test accuracy per epoch, per loss;

and prints the test accuracy of each loss. For the margin losses the prediction is the
class whose weight direction has the largest cosine with the embedding (``pred`` of
``return_stats=True``); for softmax it is the argmax of the logits.

Before training it checks that the fused kernels and ``margin_ops.reference`` give the
same loss curve over the first steps (float64, same initialisation and batches) and exits
with status 1 if they do not. On one CPU core the full run takes about 15 s, ``--quick``
(fewer epochs; used by tests/test_example.py) about 6 s.

Needs scikit-learn and matplotlib (``pip install scikit-learn matplotlib``); without them
it says so (exit status 1) after parsing its arguments, so ``--help`` works regardless.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import margin_ops

#: The optional packages this example needs: {module: pip package}. Imported below only if
#: all are installed; main() reports the missing ones after parsing the arguments.
NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "numpy": "numpy"}
MISSING = [package for module, package in NEEDS.items() if importlib.util.find_spec(module) is None]
if not MISSING:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

SEED = 0
EMBEDDING_DIM = 2
NUM_CLASSES = 10
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
EPOCHS = {"full": 150, "quick": 30}
#: Steps of the fused-vs-reference check, and the largest relative per-step loss difference
#: it accepts. In float64 the two implementations differ only in summation order (~1e-16
#: per operation); training amplifies that, to ~3e-12 after 20 ArcFace steps (~1e-15 for
#: SphereFace). A real discrepancy is far larger: scaling s by 1 + 1e-7 in the reference
#: alone gives 1e-5.
CHECK_STEPS = 20
CHECK_RTOL = 1e-9

# Margins for a 2-D embedding with ten classes. There, neighbouring class directions are
# at best 2π/10 ≈ 0.63 rad apart, so ArcFace's m must stay well below that (the 512-D
# defaults, m = 0.5 and s = 64, leave no room and saturate the softmax); s = 16 lets a
# well-placed sample reach a probability near 1 without flattening the gradients.
ARCFACE = dict(s=16.0, m=0.3)
# SphereFace keeps the classic m = 4 and λ_min = 5 but starts the annealing at λ_max = 100
# instead of 1500: λ = max(5, λ_max / (1 + 0.1·iteration)) then reaches λ_min after 190
# steps (9 epochs) instead of 2990, so the margin is fully on for most of the run.
SPHEREFACE = dict(m=4, lambda_min=5.0, lambda_max=100.0)

LOSSES = ("softmax", "arcface", "sphereface")
TITLES = {
    "softmax": "softmax (linear + cross-entropy)",
    "arcface": f"ArcFace (s={ARCFACE['s']:g}, m={ARCFACE['m']:g})",
    "sphereface": (f"SphereFace (m={SPHEREFACE['m']}, "
                   f"λ: {SPHEREFACE['lambda_max']:g} → {SPHEREFACE['lambda_min']:g})"),
}


class SoftmaxHead(nn.Module):
    """``nn.Linear`` + cross-entropy, with the interface of the margin_ops heads.

    ``forward(features, labels, return_stats=True)`` returns a ``margin_ops.MarginOutput``
    whose ``pred`` is the argmax of the logits, so all three heads train and evaluate
    through the same code.
    """

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(embedding_size, num_classes)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, features, labels, return_stats: bool = False):
        logits = self.linear(features)
        loss = nn.functional.cross_entropy(logits, labels)
        if not return_stats:
            return loss
        return margin_ops.MarginOutput(loss, logits.logsumexp(dim=1), logits.argmax(dim=1))


def make_head(name: str) -> nn.Module:
    """The classifier head of loss ``name`` on the embedding (it owns the class weights)."""
    if name == "softmax":
        return SoftmaxHead(EMBEDDING_DIM, NUM_CLASSES)
    if name == "arcface":
        return margin_ops.ArcFace(EMBEDDING_DIM, NUM_CLASSES, **ARCFACE)
    return margin_ops.SphereFace(EMBEDDING_DIM, NUM_CLASSES, **SPHEREFACE)


def make_network() -> nn.Module:
    """64 pixels -> 2-D embedding. The last layer is linear so the embedding can point anywhere."""
    return nn.Sequential(
        nn.Linear(64, 64), nn.PReLU(),
        nn.Linear(64, 64), nn.PReLU(),
        nn.Linear(64, EMBEDDING_DIM),
    )


def load_data():
    """Standardized digits, split 75 / 25 stratified: (x_train, y_train, x_test, y_test) tensors."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=SEED)
    scaler = StandardScaler().fit(x_train)  # constant (always blank) pixels keep scale 1
    x_train, x_test = (torch.tensor(scaler.transform(x), dtype=torch.float32) for x in (x_train, x_test))
    y_train, y_test = (torch.tensor(y, dtype=torch.int64) for y in (y_train, y_test))
    return x_train, y_train, x_test, y_test


def batches(num_samples: int, generator: torch.Generator):
    """One epoch of shuffled index batches."""
    return torch.randperm(num_samples, generator=generator).split(BATCH_SIZE)


def train_step(network, head, optimizer, x, y) -> float:
    """One optimizer step on batch (x, y); returns its loss."""
    optimizer.zero_grad()
    loss = head(network(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def make_optimizer(network, head):
    """Adam over the network and the head's class weights."""
    return torch.optim.Adam([*network.parameters(), *head.parameters()], lr=LEARNING_RATE)


@torch.no_grad()
def evaluate(network, head, x, y):
    """(test accuracy, test embeddings). Eval mode: SphereFace's λ counter does not advance."""
    network.eval()
    head.eval()
    embeddings = network(x)
    pred = head(embeddings, y, return_stats=True).pred
    network.train()
    head.train()
    return (pred == y).double().mean().item(), embeddings


def check_fused_matches_reference(x_train, y_train) -> bool:
    """Trains two float64 copies CHECK_STEPS steps, fused vs reference backend; prints the gap."""
    fused_backend = margin_ops.current_backend("cpu")
    ok = True
    for name in ("arcface", "sphereface"):
        torch.manual_seed(SEED)
        fused = (make_network().double(), make_head(name).double())
        reference = copy.deepcopy(fused)
        steps = batches(len(x_train), torch.Generator().manual_seed(SEED))[:CHECK_STEPS]
        curves = {}
        for label, (network, head) in (("fused", fused), ("reference", reference)):
            optimizer = make_optimizer(network, head)
            with margin_ops.backend(fused_backend if label == "fused" else "reference"):
                curves[label] = [train_step(network, head, optimizer, x_train[i].double(), y_train[i])
                                 for i in steps]
        worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(curves["fused"], curves["reference"]))
        verdict = "OK" if worst <= CHECK_RTOL else "MISMATCH"
        ok &= worst <= CHECK_RTOL
        print(f"fused ({fused_backend!r}) vs 'reference' backend, {name}: {len(steps)} float64 steps, "
              f"loss {curves['fused'][0]:.6f} -> {curves['fused'][-1]:.6f}, "
              f"max relative difference {worst:.1e} (tolerance {CHECK_RTOL:.0e}): {verdict}")
    return ok


def train(name: str, epochs: int, data):
    """Trains one loss from the shared initialisation; returns its history and final state."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(SEED)  # same network initialisation for every loss
    network, head = make_network(), make_head(name)
    optimizer = make_optimizer(network, head)
    # Decaying the step to 0 settles the margin losses, which otherwise keep jumping
    # between nearly equivalent arrangements of the ten directions.
    total_steps = epochs * math.ceil(len(x_train) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    generator = torch.Generator().manual_seed(SEED)  # same batch order for every loss
    history = {"loss": [], "accuracy": []}
    for _ in range(epochs):
        losses = []
        for i in batches(len(x_train), generator):
            losses.append(train_step(network, head, optimizer, x_train[i], y_train[i]))
            schedule.step()
        accuracy, embeddings = evaluate(network, head, x_test, y_test)
        history["loss"].append(float(np.mean(losses)))
        history["accuracy"].append(accuracy)
    return history, embeddings, head.weight.detach()


def mean_angle_degrees(embeddings, weight, labels) -> float:
    """Mean angle between each embedding and its own class-weight direction: how tight the arcs are."""
    directions = nn.functional.normalize(weight, dim=1)[labels]
    cosine = (nn.functional.normalize(embeddings, dim=1) * directions).sum(dim=1)
    return torch.rad2deg(torch.acos(cosine.clamp(-1, 1))).mean().item()


def plot_embeddings(results, y_test, path: Path):
    """One panel per loss: test embeddings as angles on the unit circle, weight directions."""
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.6))
    # Points sit at their angle; the small random radius only keeps overlapping points visible.
    jitter = 1 + 0.06 * np.random.default_rng(SEED).standard_normal(len(y_test))
    circle = np.linspace(0, 2 * math.pi, 200)
    for ax, (name, result) in zip(axes, results.items()):
        angle = torch.atan2(result["embeddings"][:, 1], result["embeddings"][:, 0]).numpy()
        ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=0.8, zorder=0)
        ax.scatter(jitter * np.cos(angle), jitter * np.sin(angle), s=7, alpha=0.6, linewidths=0,
                   c=[colours[c] for c in y_test.tolist()], rasterized=True)
        for c, w in enumerate(nn.functional.normalize(result["weight"], dim=1).tolist()):
            ax.plot([0, 1.25 * w[0]], [0, 1.25 * w[1]], color=colours[c], lw=1.5)
            ax.text(1.42 * w[0], 1.42 * w[1], str(c), color=colours[c], fontsize=11,
                    fontweight="bold", ha="center", va="center")
        spread = mean_angle_degrees(result["embeddings"], result["weight"], y_test)
        ax.set_title(f"{TITLES[name]}\ntest accuracy {result['history']['accuracy'][-1]:.3f}, "
                     f"mean angle to own class {spread:.1f}°", fontsize=10)
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal")
        ax.axis("off")
    fig.suptitle("Digits test set: normalized 2-D embeddings (colour = true class), "
                 "lines = class-weight directions", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave the top strip to the suptitle
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(results, path: Path):
    """Training loss (log scale) and test accuracy per epoch, one line per loss."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, result in results.items():
        epochs = range(1, len(result["history"]["loss"]) + 1)
        ax_loss.plot(epochs, result["history"]["loss"], label=name)
        ax_acc.plot(epochs, result["history"]["accuracy"], label=name)
    # Each loss has its own scale (s, margin, λ), so compare the shapes, not the levels.
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="training loss (mean over epoch)",
                title="training loss (scales differ per loss)")
    # The first epochs run from chance (0.1) upwards; the differences are in the top band.
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (top band)", ylim=(0.8, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{EPOCHS['quick']} epochs instead of {EPOCHS['full']}")
    parser.add_argument("--out", type=Path, default=Path("examples-out"),
                        help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if MISSING:
        print(f"error: this example needs {' and '.join(MISSING)}, which {'is' if len(MISSING) == 1 else 'are'} "
              f"not installed here. Install {'it' if len(MISSING) == 1 else 'them'} with:\n"
              f"    pip install {' '.join(MISSING)}",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    # The tensors are tiny: more threads only add synchronisation overhead.
    torch.set_num_threads(1)

    data = load_data()
    epochs = EPOCHS["quick" if args.quick else "full"]
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {NUM_CLASSES} classes, "
          f"{EMBEDDING_DIM}-D embeddings, {epochs} epochs")
    if not check_fused_matches_reference(data[0], data[1]):
        print("error: the fused op and the reference disagree", file=sys.stderr)
        return 1

    results = {}
    for name in LOSSES:
        history, embeddings, weight = train(name, epochs, data)
        results[name] = {"history": history, "embeddings": embeddings, "weight": weight}
        print(f"test accuracy {name}: {history['accuracy'][-1]:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_embeddings(results, data[3], args.out / "digits_embeddings.png")
    plot_curves(results, args.out / "digits_curves.png")
    print(f"wrote {args.out / 'digits_embeddings.png'} and {args.out / 'digits_curves.png'} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
