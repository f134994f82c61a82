"""Training SpecEE predictors (torch) and choosing where they run.

One MLP per layer (features [lc, p, d] of the k candidates -> 512 -> 1), BCE loss, Adam,
as the SpecEE authors train them; d is the change of p since the layer that inference checks
before this one (see previous_checked_layer), so training sees what inference computes.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from .calibration import Records
from .predictor_file import LayerPredictor


def previous_checked_layer(layer: int, offline: Sequence[int]) -> int:
    """The layer inference usually scores just before `layer`: the previous offline layer for an
    offline layer, two below for the online ones ({e-2, e, e+2}); -1 for none."""
    below = [il for il in offline if il < layer]
    if layer in offline:
        return max(below) if below else -1
    return layer - 2 if layer >= 2 else -1


def features(records: Records, layer: int, previous: int) -> np.ndarray:
    """[lc, p, d] rows for one layer, as the native controller computes them."""
    def softmax(lc):
        e = np.exp(lc - lc.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    lc = records.cand_logits[:, layer, :]
    p = softmax(lc)
    d = p - softmax(records.cand_logits[:, previous, :]) if previous >= 0 else p
    return np.concatenate([lc, p, d], axis=1).astype(np.float32)


def oracle_exit_layers(records: Records) -> np.ndarray:
    """Per step, the earliest layer from which the layer's argmax is the emitted token at every
    deeper layer and a candidate (what a perfect predictor could exit at with the verify rule);
    n_layer - 1 when only the last layer qualifies."""
    n_layer = records.label.shape[1]
    ok = records.label & records.top1_in_cands
    settled = np.flip(np.logical_and.accumulate(np.flip(records.label, axis=1), axis=1), axis=1)
    exitable = settled & ok
    exitable[:, -1] = True
    return np.argmax(exitable, axis=1) if len(records.label) else np.zeros(0, int) + n_layer - 1


def settled_rates(records: Records):
    """Per layer, the share of steps where the layer already gives the emitted token: by the full
    vocabulary's argmax, and by the best of the candidates (the token must be a candidate)."""
    full_vocab = records.label.mean(axis=0)
    best = np.argmax(records.cand_logits, axis=2)                  # [T, L]
    restricted = (best == records.final_index[:, None]) & (records.final_index[:, None] >= 0)
    return full_vocab, restricted.mean(axis=0)


def choose_offline_layers(records: Records, count: int) -> List[int]:
    """The `count` layers (in [0, n_layer-2]) where oracle exits happen most often."""
    n_layer = records.label.shape[1]
    hist = np.bincount(oracle_exit_layers(records), minlength=n_layer)[: n_layer - 1]
    ranked = [int(il) for il in np.argsort(-hist, kind="stable") if hist[il] > 0][:count]
    if len(ranked) < count:  # too few exits seen: fill with the deepest layers
        ranked += [il for il in range(n_layer - 2, -1, -1) if il not in ranked][: count - len(ranked)]
    return sorted(ranked)


@dataclass
class LayerMetrics:
    layer: int
    positives: float   # share of steps whose layer argmax is the emitted token
    precision: float   # of predicted exits (score > threshold), share correct
    recall: float      # of correct steps, share predicted


def train_layer(x: np.ndarray, y: np.ndarray, *, hidden: int = 512, epochs: int = 100, lr: float = 1e-3,
                batch: int = 1024, seed: int = 0) -> LayerPredictor:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=generator).split(batch):
            optimizer.zero_grad()
            loss_fn(model(xs[idx]).squeeze(1), ys[idx]).backward()
            optimizer.step()
    fc1, fc2 = model[0], model[2]
    return LayerPredictor(fc1.weight.detach().numpy().copy(), fc1.bias.detach().numpy().copy(),
                          fc2.weight.detach().numpy().reshape(-1).copy(), float(fc2.bias.item()))


def scores(predictor: LayerPredictor, x: np.ndarray) -> np.ndarray:
    """The predictor's sigmoid scores, in numpy (float32, as the native controller)."""
    h = np.maximum(x @ predictor.fc1_weight.T + predictor.fc1_bias, 0.0)
    return 1.0 / (1.0 + np.exp(-(h @ predictor.fc2_weight + predictor.fc2_bias)))


def train_all(records: Records, layers: Sequence[int], offline: Sequence[int], progress=True,
              **options) -> Dict[int, LayerPredictor]:
    from tqdm import tqdm

    trained = {}
    for layer in tqdm(layers, desc="training", unit="layer", disable=not progress):
        x = features(records, layer, previous_checked_layer(layer, offline))
        trained[layer] = train_layer(x, records.label[:, layer], **options)
    return trained


def evaluate(predictors: Dict[int, LayerPredictor], records: Records, offline: Sequence[int],
             threshold: float) -> List[LayerMetrics]:
    metrics = []
    for layer, predictor in sorted(predictors.items()):
        y = records.label[:, layer]
        predicted = scores(predictor, features(records, layer, previous_checked_layer(layer, offline))) > threshold
        hits = (predicted & y).sum()
        metrics.append(LayerMetrics(layer, float(y.mean()) if len(y) else 0.0,
                                    float(hits / predicted.sum()) if predicted.sum() else float("nan"),
                                    float(hits / y.sum()) if y.sum() else float("nan")))
    return metrics


def predicted_exit_layers(predictors: Dict[int, LayerPredictor], records: Records, offline: Sequence[int],
                          threshold: float) -> np.ndarray:
    """Per step, where the verify rule would exit over the offline layers only (no online
    set); -1 where it would not."""
    exit_layer = np.full(len(records.label), -1)
    for layer in sorted(offline):
        x = features(records, layer, previous_checked_layer(layer, offline))
        fire = (scores(predictors[layer], x) > threshold) & records.top1_in_cands[:, layer] & (exit_layer < 0)
        exit_layer[fire] = layer
    return exit_layer


def simulate_schedule(predictors: Dict[int, LayerPredictor], records: Records, offline: Sequence[int],
                      threshold: float):
    """(exit ratio, agreement of emitted tokens with the full model, mean layers computed) of
    predicted_exit_layers."""
    n_steps, n_layer = records.label.shape
    exit_layer = predicted_exit_layers(predictors, records, offline, threshold)
    exited = exit_layer >= 0
    correct = records.label[np.arange(n_steps), np.where(exited, exit_layer, n_layer - 1)]
    layers_used = np.where(exited, exit_layer + 1, n_layer)
    return float(exited.mean()), float(correct.mean()), float(layers_used.mean())
