"""A small, real training script: ridge regression fitted by gradient descent with numpy.

Reads its hyper-parameters from the command line, prints progress, writes ./outputs/model.pkl and a
metrics log under ./logs/, as any Azure ML style script would.
"""

import argparse
import json
import os
import pickle
import time

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--regularization", type=float, default=0.5)
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--learning-rate", type=float, default=0.1)
parser.add_argument("--verbose", action="store_true")
args = parser.parse_args()

rng = np.random.default_rng(42)
n, d = 2000, 8
X = rng.normal(size=(n, d))
true_w = rng.normal(size=d)
y = X @ true_w + 0.1 * rng.normal(size=n)
train, test = slice(0, 1600), slice(1600, n)

w = np.zeros(d)
os.makedirs("outputs", exist_ok=True)
os.makedirs("logs", exist_ok=True)
print(f"training ridge regression: {n} samples, {d} features, regularization={args.regularization}")
with open("logs/metrics.jsonl", "w") as metrics:
    for epoch in range(1, args.epochs + 1):
        residual = X[train] @ w - y[train]
        grad = X[train].T @ residual / len(residual) + args.regularization * w / len(residual)
        w -= args.learning_rate * grad
        loss = float(np.mean((X[train] @ w - y[train]) ** 2))
        metrics.write(json.dumps({"epoch": epoch, "loss": loss}) + "\n")
        if args.verbose or epoch % 5 == 0:
            print(f"epoch {epoch:3d}  train mse {loss:.5f}")
        time.sleep(0.02)

test_mse = float(np.mean((X[test] @ w - y[test]) ** 2))
print(f"test mse {test_mse:.5f}")
with open("outputs/model.pkl", "wb") as fh:
    pickle.dump({"weights": w, "regularization": args.regularization, "test_mse": test_mse}, fh)
print("saved outputs/model.pkl")
